"""The ``torch.save`` zip archive, checked before anything in it is read, for
:mod:`mechfaith.lm.safe_unpickle`.

:func:`open_torch_zip` opens the archive and checks every entry's declared sizes against the file's
real size before a byte of it is read: ``torch.save`` stores entries uncompressed and unencrypted, so
a compressed (zip bomb), encrypted or oversized entry, or a directory of more entries than a
transcoder's could need, is refused. :func:`read_entry` reads one entry
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
MAX_CENTRAL_DIRECTORY = 1 << 21  # 2 MiB: ~20,000 entries; a transcoder's archive has about 10
# what a damaged archive can raise while zipfile reads it
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, ValueError,
              EOFError, OSError, zlib.error, struct.error, OverflowError, UnicodeDecodeError)
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def zip_problem(exc: BaseException) -> str:
    """A one-line description of an error zipfile raised."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"damaged zip archive ({type(exc).__name__}{': ' + text if text else ''})"


def central_directory_size(path: Path, size: int) -> int | None:
    """The size in bytes of the zip's central directory as its end record declares it (zip64 too);
    None when there is no end record (zipfile then refuses the file)."""
    with open(path, "rb") as fh:
        tail_len = min(size, 22 + 0xFFFF)  # the end record, and at most a maximal comment after it
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + 22 > len(tail):
            return None
        (cd_size,) = struct.unpack("<I", tail[at + 12:at + 16])
        if cd_size == 0xFFFFFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
            (offset,) = struct.unpack("<Q", tail[at - 12:at - 4])
            if offset + 56 <= size:
                fh.seek(offset)
                record = fh.read(56)
                if record[:4] == b"PK\x06\x06":
                    (cd_size,) = struct.unpack("<Q", record[40:48])
    return int(cd_size)


def open_torch_zip(path: Path) -> zipfile.ZipFile:
    """Open ``path`` as a zip archive whose entries are all stored, unencrypted and inside the file
    (and whose central directory, which zipfile turns into objects of ~11 bytes per byte, is at
    most :data:`MAX_CENTRAL_DIRECTORY` bytes)."""
    size = path.stat().st_size
    try:
        cd_size = central_directory_size(path, size)
        if cd_size is not None and cd_size > MAX_CENTRAL_DIRECTORY:
            raise CoderFileError(path, f"the zip's directory declares {cd_size} bytes, more than the "
                                       f"{MAX_CENTRAL_DIRECTORY} a transcoder's needs (refused unread)")
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
