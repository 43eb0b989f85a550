"""Reading ``torch.save`` zip files without running code from them: a restricted unpickler.

:func:`safe_torch_load` never calls ``torch.load``: only tensor-rebuild functions, storage types,
dtypes, ``torch.device``, ``OrderedDict`` and plain containers are accepted; a foreign config
object's class becomes a plain dict (with a ``__class__`` entry); a call to anything else
(``os.system``...) is refused with :class:`UnsafePickleError` before anything runs.

Memory stays bounded by the file's size (:mod:`mechfaith.lm.torch_zip` checks the archive first):
entries must be stored uncompressed, unencrypted and within the file; the pickle is at most
:data:`~mechfaith.lm.torch_zip.MAX_PICKLE_BYTES` and its declared lengths and memo indices are
checked before the unpickler allocates anything; each storage is read once and all of them together
hold at most the file's bytes; a tensor may not be larger than its storage (no stride-0 or
overlapping views) and all tensors together hold at most the file's bytes; the unpickled objects nest at
most :data:`~mechfaith.coders.validate.MAX_NESTING` deep, without cycles, and number at most
:data:`MAX_OBJECTS`. Every damaged archive raises :class:`CoderFileError` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechfaith.coders.validate import MAX_NESTING
from mechfaith.errors import CoderFileError, MechfaithError
from mechfaith.lm.torch_zip import check_pickle_size, open_torch_zip, read_entry, scan_pickle

MAX_OBJECTS = 100_000  # objects reached while converting the unpickled data (a transcoder's: ~100)


class UnsafePickleError(MechfaithError):
    """A pickle asked for something outside the allowed set; nothing from it was run."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_DTYPE_NAMES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "bool", "float", "double", "half", "long", "int"}
_DENIED_MODULES = ("os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil",
                   "importlib", "socket", "pickle", "marshal", "runpy", "code", "codecs", "ctypes",
                   "io", "pty", "platform", "webbrowser", "types", "functools", "operator", "torch",
                   "numpy", "pathlib", "tempfile", "glob", "multiprocessing", "threading", "asyncio")


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype


class _StubMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:  # a REDUCE on a stub: refuse
        raise UnsafePickleError(f"the pickle calls {cls.__qualname__}(...), which is not allowed")


class _Stub(metaclass=_StubMeta):
    """Stands in for a pickled object of a foreign class; keeps its state as plain data."""

    _pickled_name = ""

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_state", state)


def _rebuild_parameter(data: Tensor, requires_grad: bool = False, backward_hooks: Any = None) -> Tensor:
    if not isinstance(data, Tensor):
        raise UnsafePickleError("a parameter was rebuilt from something that is not a tensor")
    return data


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


class _Plainer:
    """Stubs -> dicts (with their class name), containers recursively; tensors kept. Refuses
    cycles, nesting deeper than MAX_NESTING and more than MAX_OBJECTS objects (shared ones counted
    each time they are reached, so a small pickle cannot expand into a huge structure)."""

    def __init__(self, path: Path) -> None:
        self.path, self.count, self.active = path, 0, set[int]()

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_OBJECTS:
            raise CoderFileError(self.path, f"the pickle holds more than {MAX_OBJECTS} objects")
        if not isinstance(obj, (_Stub, dict, list, tuple, set, frozenset)):
            return str(obj).replace("torch.", "") if isinstance(obj, torch.dtype) else obj
        if depth >= MAX_NESTING:
            raise CoderFileError(self.path, f"the pickle nests containers deeper than {MAX_NESTING} levels")
        if id(obj) in self.active:
            raise CoderFileError(self.path, "the pickle holds a container that contains itself")
        self.active.add(id(obj))
        try:
            return self._convert(obj, depth + 1)
        finally:
            self.active.discard(id(obj))

    def _convert(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, _Stub):
            state = getattr(obj, "_state", {})
            if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) \
                    and isinstance(state[0], (dict, type(None))):
                state = {**(state[0] or {}), **state[1]}
            out: dict[str, Any] = {"__class__": type(obj)._pickled_name}
            if isinstance(state, dict):
                out.update({str(k): self(v, depth) for k, v in state.items()})
            else:
                out["state"] = self(state, depth)
            return out
        if isinstance(obj, dict):
            return {k: self(v, depth) for k, v in obj.items()}
        if isinstance(obj, (set, frozenset)):
            return obj  # hashable members only: no tensors or containers that need converting
        return type(obj)(self(v, depth) for v in obj)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes | bytearray, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self._stubs: dict[tuple[str, str], type] = {}
        self.storages: dict[str, Tensor] = {}
        self.budget = {"storage": path.stat().st_size, "tensor": path.stat().st_size}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self.rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageRef(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        if module == "torch" and name == "device":
            return _device
        if module == "builtins" and name in ("set", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]
        root = module.split(".")[0]
        if root in _DENIED_MODULES or not re.fullmatch(r"[A-Z][A-Za-z0-9_]*", name):
            raise UnsafePickleError(f"{self.path}: the pickle refers to {module}.{name}, which is not "
                                    f"allowed (only tensors, plain containers and config objects)")
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = _StubMeta(name, (_Stub,), {"_pickled_name": f"{module}.{name}"})
        return self._stubs[key]

    def _spend(self, kind: str, nbytes: int, what: str) -> None:
        if nbytes > self.budget[kind]:
            raise CoderFileError(self.path, f"{what} would take {nbytes} bytes, more than the file "
                                            f"holds ({kind}s in all at most the file's size)")
        self.budget[kind] -= nbytes

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.path}: unexpected persistent id {pid!r:.80}")
        _, ref, key, _location, numel = pid
        if not isinstance(ref, _StorageRef):
            raise UnsafePickleError(f"{self.path}: storage of unknown type {ref!r:.80}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CoderFileError(self.path, f"storage reference {pid!r:.80} is malformed")
        if key in self.storages:
            if self.storages[key].dtype != ref.dtype:
                raise CoderFileError(self.path, f"storage {key} is used with two dtypes")
            return self.storages[key]
        entry = f"{self.prefix}/data/{key}"
        itemsize = torch.empty(0, dtype=ref.dtype).element_size()
        try:
            declared = self.archive.getinfo(entry).file_size
        except KeyError:
            raise CoderFileError(self.path, f"storage {entry} is missing from the archive") from None
        if declared != numel * itemsize:
            raise CoderFileError(self.path, f"storage {key} holds {declared} bytes, expected {numel} "
                                            f"values of {itemsize} bytes")
        self._spend("storage", declared, f"storage {key}")
        raw = read_entry(self.archive, entry, self.path)
        flat = torch.frombuffer(raw, dtype=ref.dtype) if raw else torch.empty(0, dtype=ref.dtype)
        self.storages[key] = flat
        return flat

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> Tensor:
        """A tensor of ``storage``, checked to lie inside it and to be no larger than it."""
        if not isinstance(storage, Tensor):
            raise UnsafePickleError(f"{self.path}: a tensor was rebuilt from something that is not a storage")
        dims = (size, stride)
        if not all(isinstance(d, tuple) and all(isinstance(v, int) and v >= 0 for v in d) for d in dims) \
                or len(size) != len(stride) or not isinstance(offset, int) or offset < 0:
            raise CoderFileError(self.path, f"a tensor has a malformed shape {size!r:.60}, stride "
                                            f"{stride!r:.60} or offset {offset!r:.20}")
        numel = 1
        for n in size:
            numel *= n
        last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if numel else 0
        if numel and (last >= storage.numel() or numel > storage.numel()):
            raise CoderFileError(self.path, f"a tensor of shape {size!r:.60} (stride {stride!r:.60}) is larger "
                                            f"than its storage of {storage.numel()} values")
        self._spend("tensor", numel * storage.element_size(), f"a tensor of shape {size!r:.60}")
        return storage.as_strided(size, stride, offset).clone()


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """Read a ``torch.save`` zip file with the restricted unpickler (no code from the file runs).
    Foreign config objects come back as dicts with a ``__class__`` entry."""
    path = Path(path)
    if not path.is_file():
        raise CoderFileError(path, "file not found")
    if not zipfile.is_zipfile(path):
        raise CoderFileError(path, "not a torch.save zip archive (legacy or plain pickles are refused)")
    with open_torch_zip(path) as archive:
        names = archive.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CoderFileError(path, "not a torch.save archive (no single */data.pkl)")
        prefix = pkls[0].rsplit("/", 1)[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in names and bytes(read_entry(archive, byteorder, path)).strip() not in (b"little",):
            raise CoderFileError(path, "big-endian tensor data is not supported")
        check_pickle_size(archive.getinfo(pkls[0]).file_size, path)  # before reading it
        data = read_entry(archive, pkls[0], path)
        scan_pickle(data, path)
        unpickler = _RestrictedUnpickler(data, archive, prefix, path)
        try:
            obj = unpickler.load()
        except UnsafePickleError as exc:
            if str(exc).startswith(f"{path}: "):
                raise
            raise UnsafePickleError(f"{path}: {exc}") from None
        except CoderFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, RuntimeError, RecursionError, MemoryError, OverflowError) as exc:
            raise CoderFileError(path, f"unreadable pickle ({type(exc).__name__}: {exc})") from None
    return _Plainer(path)(obj)
