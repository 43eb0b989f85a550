"""The ``torch.save`` zip archive, checked before anything in it is read, for
:mod:`mechfaith.lm.safe_unpickle`.

:func:`open_torch_zip` opens the archive and checks every entry's declared sizes against the file's
real size before a byte of it is read: ``torch.save`` stores entries uncompressed and unencrypted, so
a compressed (zip bomb), encrypted or oversized entry is refused. :func:`read_entry` reads one entry
into a buffer of its declared size (the CRC is checked at its end). :func:`scan_pickle` walks the
pickle's opcodes (``pickletools``, which allocates nothing from declared lengths) and refuses the
declared lengths, frames and memo indices that would make the unpickler allocate more than the
pickle holds. Each problem is a :class:`~mechfaith.errors.CoderFileError` naming the file.
"""

from __future__ import annotations

import pickletools
import struct
import zipfile
import zlib
from pathlib import Path

from mechfaith.errors import CoderFileError

MAX_PICKLE_BYTES = 1 << 18  # 256 KiB: a transcoder's data.pkl is a few kB
# what a damaged archive can raise while zipfile reads it
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, ValueError,
              EOFError, OSError, zlib.error, struct.error, OverflowError, UnicodeDecodeError)
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def zip_problem(exc: BaseException) -> str:
    """A one-line description of an error zipfile raised."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"damaged zip archive ({type(exc).__name__}{': ' + text if text else ''})"


def open_torch_zip(path: Path) -> zipfile.ZipFile:
    """Open ``path`` as a zip archive whose entries are all stored, unencrypted and inside the file."""
    size = path.stat().st_size
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise CoderFileError(path, zip_problem(exc)) from None
    try:
        for info in archive.infolist():
            name = info.filename
            if info.flag_bits & 0x1:
                raise CoderFileError(path, f"zip entry {name} is encrypted (torch.save never encrypts)")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CoderFileError(path, f"zip entry {name} is compressed (method {info.compress_type}); "
                                           f"torch.save stores entries uncompressed")
            if info.file_size != info.compress_size or info.header_offset + info.file_size > size:
                raise CoderFileError(path, f"zip entry {name} declares {info.file_size} bytes, more than "
                                           f"the file ({size} bytes) holds")
    except BaseException:
        archive.close()
        raise
    return archive


def read_entry(archive: zipfile.ZipFile, name: str, path: Path) -> bytearray:
    """The bytes of entry ``name`` (its size was checked by :func:`open_torch_zip`), CRC checked."""
    try:
        info = archive.getinfo(name)
        buf = bytearray(info.file_size)
        view = memoryview(buf)
        with archive.open(info) as fh:
            pos = 0
            while pos < len(buf):
                chunk = fh.read(min(1 << 20, len(buf) - pos))
                if not chunk:
                    raise CoderFileError(path, f"zip entry {name} is truncated")
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
            if fh.read(1):  # also reaches the entry's end, where zipfile checks the CRC
                raise CoderFileError(path, f"zip entry {name} is longer than declared")
    except KeyError:
        raise CoderFileError(path, f"zip entry {name} is missing from the archive") from None
    except ZIP_ERRORS as exc:
        raise CoderFileError(path, zip_problem(exc)) from None
    return buf


def check_pickle_size(nbytes: int, path: Path) -> None:
    """Refuse a pickle of more than :data:`MAX_PICKLE_BYTES` (before reading it)."""
    if nbytes > MAX_PICKLE_BYTES:
        raise CoderFileError(path, f"the pickle is {nbytes} bytes, more than the {MAX_PICKLE_BYTES} "
                                   f"a transcoder's needs (refused unread)")


def scan_pickle(data: bytes | bytearray, path: Path) -> None:
    """Refuse a pickle whose declared lengths, frames or memo indices exceed what it holds."""
    check_pickle_size(len(data), path)
    try:
        for opcode, arg, pos in pickletools.genops(bytes(data)):
            if opcode.name in _MEMO_OPS and isinstance(arg, int) and arg >= len(data):
                raise CoderFileError(path, f"the pickle's memo index {arg} at byte {pos} is out of range")
            if opcode.name == "FRAME" and isinstance(arg, int) and arg > len(data) - (pos or 0):
                raise CoderFileError(path, f"the pickle's frame at byte {pos} is longer than the pickle")
    except CoderFileError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise CoderFileError(path, f"unreadable pickle ({type(exc).__name__}: {exc})") from None
