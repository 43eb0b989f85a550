"""What a command may replace at its ``--out`` (issue 15, output safety), in one place for every command.

- An ``--out`` that does not exist, an empty folder, or a folder holding only what the same command
  writes (its own earlier result, and the temporaries an interrupted write of it left) is written.
- An existing file or link, or a folder holding anything else, is refused in one line (exit 2,
  nothing touched) unless ``--overwrite`` is given; then the old entry is replaced whole, only once
  the new result is complete (:func:`mechfaith.atomic.atomic_dir`). The current folder, or one that
  holds it, is never replaced.
- Commands that write their result at the end (:func:`new_output`) always write it into a temporary
  folder that replaces ``--out`` whole. Commands that write as they go and resume (checkpoints,
  activation caches: :func:`run_output`) write in place into their own folder, and into a
  temporary folder only with ``--overwrite`` over an existing one (``--resume`` with it is refused).
- A JSON file ``--out`` (``lm eval``, ``intervene``): an existing file is replaced when this command
  wrote it (:func:`json_written_by`) or with ``--overwrite``; a folder there is always refused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Callable, Collection, Iterator

from mechfaith.atomic import atomic_dir, check_file_replaceable, check_replaceable, clean_stale_temps
from mechfaith.errors import ConfigError, InputError
from mechfaith.jsonio import loads_json

OVERWRITE_HELP = ("replace an existing --out that is a file or holds other things than this command writes "
                  "(replaced whole, once the new result is complete)")
MAX_OWN_JSON = 64 << 20  # a JSON --out larger than this is not read to tell whether it is ours


def add_overwrite_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, help: str = OVERWRITE_HELP) -> None:
    """The ``--overwrite`` flag (``args.overwrite``)."""
    p.add_argument("--overwrite", action="store_true", help=help)


@contextlib.contextmanager
def new_output(out: str | os.PathLike[str], own_names: Collection[str], what: str, *,
               overwrite: bool = False) -> Iterator[Path]:
    """Check ``out`` (module docstring), then yield a temporary folder beside it that replaces it whole
    when the block completes (removed when it fails)."""
    check_replaceable(out, own_names, what, overwrite=overwrite)
    with atomic_dir(out) as tmp:
        yield tmp


@contextlib.contextmanager
def run_output(out: str | os.PathLike[str], own_names: Collection[str], what: str, *,
               overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Check ``out`` (module docstring), then yield where a command that writes as it goes writes: ``out``
    itself when it is new, empty or its own earlier folder; with ``overwrite`` over an existing entry, a
    temporary folder that replaces it whole once the block completes (a run stopped before then leaves
    nothing behind, and nothing to resume; one killed outright leaves its temporary, which the next run
    writing ``out`` removes)."""
    path = Path(out)
    if overwrite and resume:
        raise ConfigError("--resume continues the run in --out and --overwrite would replace it: give one of them")
    if overwrite and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        raise ConfigError("--overwrite is not available under torchrun (the processes share --out): "
                          "remove the old folder first, or give a new one")
    check_replaceable(path, own_names, what, overwrite=overwrite)
    if overwrite and os.path.lexists(path):
        with atomic_dir(path) as tmp:
            yield tmp
    else:
        clean_stale_temps(path)  # what an earlier --overwrite run, killed outright, left beside it
        yield path


def json_written_by(commands: Collection[str], keys: Collection[str] = ()) -> Callable[[Path], bool]:
    """A test for :func:`check_out_file`: the file is a JSON object whose ``"command"`` is one of
    ``commands``, or (files written before the field) that holds every one of ``keys`` when given. A
    file over :data:`MAX_OWN_JSON` bytes is not read, and is not ours."""

    def is_own(path: Path) -> bool:
        try:
            if path.stat().st_size > MAX_OWN_JSON:
                return False
            data = loads_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, InputError):
            return False
        if not isinstance(data, dict):
            return False
        return data.get("command") in commands or (bool(keys) and all(k in data for k in keys))

    return is_own


def check_out_file(out: str | os.PathLike[str], is_own: Callable[[Path], bool], *, overwrite: bool = False,
                   flag: str = "--out") -> None:
    """Refuse a file ``--out`` that is a folder, or an existing file this command did not write (``is_own``)
    unless ``overwrite`` (see :func:`mechfaith.atomic.check_file_replaceable`)."""
    check_file_replaceable(out, is_own, overwrite=overwrite, flag=flag)
