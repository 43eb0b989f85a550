"""Atomic file writing: write to a temporary file in the same folder, then rename over the target.

A crash or a full disk leaves either the old file or the new one, never half of one. Temporaries
are removed on every exit path; a process killed outright (SIGKILL, power loss) leaves its
temporary behind, and the next atomic write of the same target removes it
(:func:`clean_stale_temps`: only names of our own pattern, last changed before this process started).
One killed in the instant between moving an old folder aside and putting the new one in its place
leaves the old one as ``.<name>.old``: the next check or write of that target puts it back first
(:func:`restore_interrupted`), as if the killed write had never started.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Collection, Iterator

from mechfaith.errors import ConfigError

log = logging.getLogger(__name__)
STARTED = time.time()  # temporaries last changed before this (the import of this module) are stale
# what tempfile.mkstemp/mkdtemp append to ".<target name>.": 8 random characters, [suffix] and ".tmp"
_TEMP_TAIL = re.compile(r"[a-z0-9_]{8}(?:\.[^/]*)?\.tmp")
_PENDING: dict[Path, Path] = {}  # the temporary folder of each atomic_dir block in progress -> its target


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


def restore_interrupted(target: str | os.PathLike[str]) -> bool:
    """Put back the old entry that a process killed outright while :func:`atomic_dir` replaced ``target``
    left aside: a ``.<name>.old`` with nothing at ``target`` becomes ``target`` again (the new result,
    in a temporary :func:`clean_stale_temps` removes later, is dropped). Returns whether it did."""
    target = Path(target)
    if target.name in ("", ".", ".."):
        return False
    old = target.with_name(f".{target.name}.old")
    if os.path.lexists(target) or not os.path.lexists(old):
        return False
    try:
        os.replace(old, target)
    except FileNotFoundError:  # another process put it back first
        return False
    log.warning("%s was being replaced when a command was killed; its old contents are back in place", target)
    return True


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those it created, the deepest first."""
    made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _remove_made(made: list[Path]) -> None:
    """Remove the folders :func:`_make_folder` created, while they are empty (a write that failed leaves
    no empty folders behind)."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def _check_target(target: Path) -> None:
    if target.name in ("", ".", ".."):
        raise ConfigError(f"{target}: not a name that can be written atomically (give a new file or folder)")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    _check_target(target)
    made = _make_folder(target.parent)
    clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    done = False
    try:
        os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        done = True
    finally:
        if tmp_path.is_dir() and not tmp_path.is_symlink():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists() or tmp_path.is_symlink():
            tmp_path.unlink()
        if not done:
            _remove_made(made)


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
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole (a folder,
    or a file or link of that name, never what a link points to).

    The old entry (if any) is moved aside first and removed only after the new one is in place,
    so at every instant one complete entry exists under ``target`` or its ``.old`` name. While the
    block runs, :func:`final_path` maps paths inside the temporary folder to their names under ``target``.
    """
    target = Path(target)
    _check_target(target)
    restore_interrupted(target)
    with contextlib.suppress(OSError):  # (a deleted current folder holds nothing)
        if Path.cwd().resolve().is_relative_to(target.resolve()):
            raise ConfigError(f"{target} is the current folder or holds it: it cannot be replaced "
                              f"(give a new folder)")
    old = target.with_name(f".{target.name}.old")
    made = _make_folder(target.parent)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _PENDING[tmp] = target
    done = False
    try:
        yield tmp
        _remove(old)
        moved = os.path.lexists(target)
        if moved:
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if moved and not os.path.lexists(target):
                os.replace(old, target)  # put the old entry back under its name
            raise
        done = True
        _remove(old)
    finally:
        _PENDING.pop(tmp, None)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _remove_made(made)


def _remove(path: Path) -> None:
    """Remove ``path`` whatever it is (a folder with everything in it; a file or a link itself)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def final_path(path: str | os.PathLike[str]) -> Path:
    """The name ``path`` will have once the :func:`atomic_dir` blocks writing it are complete (``path``
    itself when none is): for the paths a result records about itself while it is written."""
    found = Path(path)
    for _ in range(len(_PENDING) + 1):  # nested blocks: a temporary inside another's temporary
        for tmp, target in sorted(_PENDING.items(), key=lambda item: -len(item[0].parts)):  # innermost first
            if found == tmp or tmp in found.parents:
                found = target / found.relative_to(tmp)
                break
        else:
            break
    return found


def _matches(name: str, patterns: Collection[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _is_own(name: str, own_names: Collection[str]) -> bool:
    """Whether ``name`` matches one of ``own_names`` (shell patterns), or is the temporary
    (``.<name>.<8 characters>[suffix].tmp``) or the ``.<name>.old`` that an interrupted atomic write
    of one of them left behind."""
    if _matches(name, own_names):
        return True
    if not name.startswith("."):
        return False
    rest = name[1:]
    if rest.endswith(".old") and _matches(rest[:-4], own_names):
        return True
    return any(ch == "." and _matches(rest[:i], own_names) and _TEMP_TAIL.fullmatch(rest[i + 1:])
               for i, ch in enumerate(rest))


def check_replaceable(target: str | os.PathLike[str], own_names: Collection[str], what: str, *,
                      overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse (:class:`~mechfaith.errors.ConfigError`) to write the folder ``target`` unless it is new,
    an empty folder, or a folder holding only ``own_names`` (shell patterns: what a ``what`` written
    before holds, with the temporaries an interrupted write of them left): never a file, a link or a
    folder of other things, unless ``overwrite`` (then the caller replaces it whole, with
    :func:`atomic_dir`); never the current folder or one that holds it."""
    path = Path(target)
    restore_interrupted(path)  # a replacement killed half-way: check (and keep) the old entry
    if not os.path.lexists(path):
        return
    with contextlib.suppress(OSError):
        if Path.cwd().resolve().is_relative_to(path.resolve()):
            raise ConfigError(f"{flag} {path} is the current folder or holds it: give a new folder")
    if overwrite:
        return
    if path.is_symlink() or not path.is_dir():
        kind = "a link" if path.is_symlink() else "a file"
        raise ConfigError(f"{path} is {kind}, not an empty folder: give {flag} a new folder "
                          f"(or --overwrite to replace it)")
    others = sorted(c.name for c in path.iterdir() if not _is_own(c.name, own_names))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(f"{path} is not an empty folder and holds files that are not a {what}'s ({shown}): "
                          f"give {flag} a new or empty folder (or --overwrite to replace it whole)")


def check_file_replaceable(target: str | os.PathLike[str], is_own: Callable[[Path], bool], *,
                           overwrite: bool = False, flag: str = "--out") -> None:
    """Refuse (:class:`~mechfaith.errors.ConfigError`) to write the file ``target`` when it is a folder
    (even with ``overwrite``), or an existing file for which ``is_own`` (a file this command wrote
    before) is false, unless ``overwrite``."""
    path = Path(target)
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder, not a file: give a file name")
    if overwrite or (not path.is_symlink() and is_own(path)):
        return
    raise ConfigError(f"{path} exists and is not a file this command wrote: give {flag} a new file "
                      f"(or --overwrite to replace it)")
