"""sparsify (EleutherAI) coder folders and runs, both ways: one import for :func:`export_sparsify`,
:func:`import_sparsify`, :func:`read_sparsify_run` and :func:`export_set_sparsify`.

- :mod:`mechfaith.lm.sparsify_format`: file names, config fields, hookpoints (:func:`parse_hookpoint`,
  :func:`hookpoint_for`), which folders are sparsify folders and runs.
- :mod:`mechfaith.lm.sparsify_read`: a sparsify folder into a coder computing exactly what sparsify
  computes; what mechfaith cannot compute (``groupmax``, ``signed``) refused in one line naming it.
- :mod:`mechfaith.lm.sparsify_write`: a TopK coder as a sparsify folder that sparsify loads; other
  coders refused before writing.
- :mod:`mechfaith.lm.sparsify_run`: a run (one folder per hookpoint) as a coder set, and a set as a run.

``tests/fixtures/sparsify/`` holds folders written by sparsify itself with the outputs it computes
(``benchmarks/make_sparsify_fixtures.py`` regenerates them); ``tests/lm/test_sparsify_fixtures.py``
checks mechfaith against them.
"""

from __future__ import annotations

from mechfaith.lm.sparsify_format import (
    SPARSIFY_CFG,
    SPARSIFY_WEIGHTS,
    hookpoint_for,
    is_sparsify_folder,
    is_sparsify_run,
    parse_hookpoint,
    run_hookpoints,
)
from mechfaith.lm.sparsify_read import import_sparsify
from mechfaith.lm.sparsify_run import export_set_sparsify, read_sparsify_run
from mechfaith.lm.sparsify_write import check_sparsify_exportable, export_sparsify

__all__ = ["SPARSIFY_CFG", "SPARSIFY_WEIGHTS", "check_sparsify_exportable", "export_set_sparsify", "export_sparsify",
           "hookpoint_for", "import_sparsify", "is_sparsify_folder", "is_sparsify_run", "parse_hookpoint",
           "read_sparsify_run", "run_hookpoints"]
