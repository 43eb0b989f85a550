"""Atomic file writing: write to a temporary file in the same folder, then rename over the target.

A crash or a full disk leaves either the old file or the new one, never half of one. Temporaries
are removed on every exit path; a process killed outright (SIGKILL, power loss) leaves its
temporary behind, and the next atomic write of the same target removes it
(:func:`clean_stale_temps`: only names of our own pattern, last changed before this process started).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Collection, Iterator

from mechfaith.errors import ConfigError

STARTED = time.time()  # temporaries last changed before this (the import of this module) are stale
# what tempfile.mkstemp/mkdtemp append to ".<target name>.": 8 random characters, [suffix] and ".tmp"
_TEMP_TAIL = re.compile(r"[a-z0-9_]{8}(?:\.[^/]*)?\.tmp")


def _newest_change(path: str) -> float:
    """The latest modification time of ``path`` and, for a folder, of everything inside it."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def clean_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries an interrupted atomic write of ``target`` left beside it: entries named
    ``.<name>.<8 random characters>[suffix].tmp`` in which nothing changed since this process
    started (so never one that this process, or another one still writing, is using). Returns what
    was removed."""
    target = Path(target)
    prefix = f".{target.name}."
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent if str(target.parent) else "."))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not _TEMP_TAIL.fullmatch(entry.name[len(prefix):]):
            continue
        try:
            if _newest_change(entry.path) >= STARTED:
                continue  # possibly in use by a process that is still writing it
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _check_target(target: Path) -> None:
    if target.name in ("", ".", ".."):
        raise ConfigError(f"{target}: not a name that can be written atomically (give a new file or folder)")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.is_dir() and not tmp_path.is_symlink():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists() or tmp_path.is_symlink():
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
    _check_target(target)
    with contextlib.suppress(OSError):  # (a deleted current folder holds nothing)
        if Path.cwd().resolve().is_relative_to(target.resolve()):
            raise ConfigError(f"{target} is the current folder or holds it: it cannot be replaced "
                              f"(give a new folder)")
    old = target.with_name(f".{target.name}.old")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
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
