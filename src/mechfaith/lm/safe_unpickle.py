"""Reading ``torch.save`` zip files without running code from them: a restricted unpickler.

:func:`safe_torch_load` never calls ``torch.load``: only tensor-rebuild functions, storage types,
dtypes, ``torch.device``, ``OrderedDict`` and plain containers are accepted; a foreign config
object's class becomes a plain dict (with a ``__class__`` entry); a call to anything else
(``os.system``...) is refused with :class:`UnsafePickleError` before anything runs.
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

from mechfaith.errors import CoderFileError, MechfaithError


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


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    if not isinstance(storage, Tensor):
        raise UnsafePickleError("a tensor was rebuilt from something that is not a storage")
    return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()


def _rebuild_parameter(data: Tensor, requires_grad: bool = False, backward_hooks: Any = None) -> Tensor:
    if not isinstance(data, Tensor):
        raise UnsafePickleError("a parameter was rebuilt from something that is not a tensor")
    return data


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


def _plain(obj: Any) -> Any:
    """Stubs -> dicts (with their class name), containers recursively; tensors kept."""
    if isinstance(obj, _Stub):
        state = getattr(obj, "_state", {})
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            merged = dict(state[0] or {})
            merged.update(state[1])
            state = merged
        out = {"__class__": type(obj)._pickled_name}
        if isinstance(state, dict):
            out.update({str(k): _plain(v) for k, v in state.items()})
        else:
            out["state"] = _plain(state)
        return out
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
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

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.path}: unexpected persistent id {pid!r:.80}")
        _, ref, key, _location, numel = pid
        if not isinstance(ref, _StorageRef):
            raise UnsafePickleError(f"{self.path}: storage of unknown type {ref!r:.80}")
        entry = f"{self.prefix}/data/{key}"
        try:
            raw = self.archive.read(entry)
        except KeyError:
            raise CoderFileError(self.path, f"storage {entry} is missing from the archive") from None
        flat = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if raw else torch.empty(0, dtype=ref.dtype)
        if flat.numel() != int(numel):
            raise CoderFileError(self.path, f"storage {key} holds {flat.numel()} values, expected {numel}")
        return flat


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """Read a ``torch.save`` zip file with the restricted unpickler (no code from the file runs).
    Foreign config objects come back as dicts with a ``__class__`` entry."""
    path = Path(path)
    if not path.is_file():
        raise CoderFileError(path, "file not found")
    if not zipfile.is_zipfile(path):
        raise CoderFileError(path, "not a torch.save zip archive (legacy or plain pickles are refused)")
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CoderFileError(path, "not a torch.save archive (no single */data.pkl)")
        prefix = pkls[0].rsplit("/", 1)[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() not in (b"little",):
            raise CoderFileError(path, "big-endian tensor data is not supported")
        unpickler = _RestrictedUnpickler(archive.read(pkls[0]), archive, prefix, str(path))
        try:
            obj = unpickler.load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, RuntimeError) as exc:
            raise CoderFileError(path, f"unreadable pickle ({type(exc).__name__}: {exc})") from None
    return _plain(obj)
