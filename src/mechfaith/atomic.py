"""Atomic file writing: write to a temporary file in the same folder, then rename over the target.

A crash or a full disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Collection, Iterator

from mechfaith.errors import ConfigError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole.

    The old folder (if any) is moved aside first and removed only after the new one is in place,
    so at every instant one complete folder exists under ``target`` or its ``.old`` name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        yield tmp
        if old.exists():
            shutil.rmtree(old)
        moved = target.exists()
        if moved:
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if moved and not target.exists():
                os.replace(old, target)  # put the old folder back under its name
            raise
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(target: str | os.PathLike[str], own_names: Collection[str], what: str) -> None:
    """Refuse (:class:`~mechfaith.errors.ConfigError`) to let :func:`atomic_dir` replace ``target``
    unless it is new, an empty folder, or a folder holding only ``own_names`` (a ``what`` written
    before, which is replaced whole): never a file, the current folder or a folder of other things."""
    path = Path(target)
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"{path} is a file, not an empty folder: give --out a new folder")
    if path.resolve() == Path.cwd().resolve():
        raise ConfigError(f"--out {path} is the current folder: give a new folder")
    others = sorted(c.name for c in path.iterdir() if c.name not in own_names)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(f"{path} is not an empty folder and holds files that are not a {what}'s ({shown}): "
                          f"give --out a new or empty folder (it would be replaced whole)")
