"""SAELens coder folders, both ways: one import for :func:`export_saelens`, :func:`import_saelens`
and :class:`ImportedCoder`.

- :mod:`mechfaith.lm.saelens_format`: file names, the architectures read, written and refused (with
  reasons), TransformerLens hook names (:func:`parse_hook`), :class:`ImportedCoder` (also what the
  released GPT-2 transcoders' importer, :mod:`mechfaith.lm.gpt2_transcoders`, returns).
- :mod:`mechfaith.lm.saelens_write`: a coder as a SAELens 6 folder that SAELens loads with its hook
  and model names; what SAELens cannot hold (a TopK transcoder) is refused before writing.
- :mod:`mechfaith.lm.saelens_read`: a SAELens folder (6.x, or a flat pre-6.0 config read with
  SAELens's defaults) into a coder computing exactly what SAELens computes; every setting that
  changes the computation is honoured or refused in one line naming it.

``tests/fixtures/saelens/`` holds folders written by SAELens itself with the outputs it computes
(``benchmarks/make_saelens_fixtures.py`` regenerates them); ``tests/lm/test_saelens_fixtures.py``
checks mechfaith against them.
"""

from __future__ import annotations

from mechfaith.lm.saelens_format import (
    READ_ARCHITECTURES,
    REFUSED,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    WRITE_ARCHITECTURES,
    ImportedCoder,
    parse_hook,
)
from mechfaith.lm.saelens_read import import_saelens
from mechfaith.lm.saelens_write import check_saelens_exportable, export_saelens, saelens_architecture

__all__ = ["READ_ARCHITECTURES", "REFUSED", "SAELENS_CFG", "SAELENS_WEIGHTS", "WRITE_ARCHITECTURES",
           "ImportedCoder", "check_saelens_exportable", "export_saelens", "import_saelens", "parse_hook",
           "saelens_architecture"]
