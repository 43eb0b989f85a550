"""Coder files: a folder with ``config.json`` and ``weights.safetensors``, written atomically.

``config.json`` holds ``format`` ("mechfaith.coder"), ``format_version``, the :class:`CoderConfig`,
the SHA-256 of the weights file (so corruption anywhere in it is caught) and an optional free-form
``training`` summary. No pickle anywhere: loading never executes code from a file. Loading checks
everything (:mod:`mechfaith.coders.validate`): the JSON's nesting and field types, the checksum
(required), the tensors' names and shapes against the config (before any memory is allocated for
the coder), and their dtypes and finiteness.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechfaith.atomic import atomic_dir, atomic_path
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.validate import check_fields, check_weights
from mechfaith.configs import config_from_dict, config_to_dict
from mechfaith.errors import CoderFileError, ConfigError, InputError
from mechfaith.jsonio import loads_json, write_json

FORMAT = "mechfaith.coder"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tensors(path: str | os.PathLike[str], tensors: dict[str, Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    """Write tensors as safetensors atomically; return the file's SHA-256."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    return digest


def read_tensors(path: str | os.PathLike[str], expected_sha256: str | None = None, *,
                 weights: bool = True) -> dict[str, Tensor]:
    """Read a safetensors file; any damage raises :class:`CoderFileError` naming the file.
    ``weights``: every tensor must be floating point and finite
    (:func:`~mechfaith.coders.validate.check_weights`); False for files holding counters or bytes."""
    path = Path(path)
    if not path.is_file():
        raise CoderFileError(path, "file not found")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CoderFileError(path, "checksum mismatch: the file is truncated or corrupt")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CoderFileError(path, f"not a readable safetensors file ({first})") from None
    if weights:
        check_weights(path, tensors)
    return tensors


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read JSON (nesting capped, :func:`~mechfaith.jsonio.loads_json`); a missing, malformed or
    too deeply nested file raises :class:`CoderFileError`."""
    path = Path(path)
    if not path.is_file():
        raise CoderFileError(path, "file not found")
    try:
        return loads_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CoderFileError(path, f"not valid JSON ({exc.__class__.__name__}: {exc})") from None
    except InputError as exc:
        raise CoderFileError(path, str(exc)) from None


def coder_state(coder: SparseCoder) -> dict[str, Tensor]:
    """The coder's tensors by name (parameters and buffers)."""
    return {k: v for k, v in coder.state_dict().items()}


def save_module_folder(tensors: dict[str, Tensor], config: Any, folder: str | os.PathLike[str], fmt: str,
                       version: int, training: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` (replaced whole, atomically): ``weights.safetensors`` and ``config.json`` with
    format ``fmt``, the dataclass ``config``, the weights' SHA-256 and the ``training`` summary."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        digest = write_tensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": fmt})
        write_json(tmp / CONFIG_NAME, {
            "format": fmt,
            "format_version": version,
            "config": config_to_dict(config),
            "weights_sha256": digest,
            "training": training or {},
        })
    return folder


def save_coder(coder: SparseCoder, folder: str | os.PathLike[str],
               training: dict[str, Any] | None = None) -> Path:
    """Save a coder into ``folder`` (replaced whole, atomically). Returns the folder."""
    return save_module_folder(coder_state(coder), coder.cfg, folder, FORMAT, FORMAT_VERSION, training)


def resolve_coder_folder(path: str | os.PathLike[str]) -> Path:
    """Accept the folder itself or either of its two files."""
    p = Path(path)
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        return p.parent
    if p.is_dir():
        return p
    if not p.exists():
        raise CoderFileError(p, "no such file or folder")
    raise CoderFileError(p, f"expected a coder folder (with {CONFIG_NAME} and {WEIGHTS_NAME})")


def read_folder_meta(path: str | os.PathLike[str], fmt: str = FORMAT, version: int = FORMAT_VERSION,
                     what: str = "mechfaith coder") -> dict[str, Any]:
    """The checked ``config.json`` of a folder of format ``fmt`` (a coder's, a CLT's): format,
    version, field types, the weights' SHA-256."""
    folder = resolve_coder_folder(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        if (folder / "cfg.json").is_file():
            raise CoderFileError(folder, f"this is a SAELens folder (cfg.json), not a {what}")
        raise CoderFileError(folder, f"no {CONFIG_NAME}: not a {what} folder")
    meta = read_json(cfg_path)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CoderFileError(cfg_path, f"not a {what} (format is not {fmt!r})")
    if meta.get("format_version") != version:
        raise CoderFileError(cfg_path, f"format version {meta.get('format_version')!r} is not supported "
                                       f"(this mechfaith reads version {version})")
    check_fields(cfg_path, meta, {"config": "dict", "weights_sha256": "str", "training": "dict|null"},
                 required=("config", "weights_sha256"))
    if not SHA256_RE.fullmatch(meta["weights_sha256"]):
        raise CoderFileError(cfg_path, f"'weights_sha256' is not a SHA-256 ({meta['weights_sha256']!r:.80})")
    return meta


def read_coder_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked contents of a coder's ``config.json``."""
    return read_folder_meta(path)


def read_checked_weights(folder: Path, meta: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The folder's weights, checksum verified, their names and shapes equal to ``expected`` (the
    config's, known before anything is allocated for the module)."""
    tensors = read_tensors(folder / WEIGHTS_NAME, expected_sha256=meta["weights_sha256"])
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CoderFileError(folder / WEIGHTS_NAME, f"tensors do not match the config "
                                                    f"(missing: {missing or '-'}, unexpected: {extra or '-'})")
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name]:
            raise CoderFileError(folder / WEIGHTS_NAME, f"tensor {name} has shape {tuple(t.shape)}, "
                                                        f"the config implies {str(expected[name])[:80]}")
    return tensors


def load_module_folder(path: str | os.PathLike[str], read_meta: Any, config_cls: type, module_cls: Any,
                       map_location: str | torch.device = "cpu") -> Any:
    """The module a :func:`save_module_folder` folder holds: its metadata checked by ``read_meta``,
    its config rebuilt as ``config_cls``, its weights checked against ``module_cls.state_shapes``
    and loaded into ``module_cls(config)``; damage of any kind raises :class:`CoderFileError`."""
    folder = resolve_coder_folder(path)
    meta = read_meta(folder)
    try:
        cfg: Any = config_from_dict(config_cls, meta["config"])
    except ConfigError as exc:
        raise CoderFileError(folder / CONFIG_NAME, f"bad config: {exc}") from None
    tensors = read_checked_weights(folder, meta, module_cls.state_shapes(cfg))
    module = module_cls(cfg)
    module.load_state_dict(tensors)
    return module.to(map_location)


def load_coder(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> SparseCoder:
    """Load a coder saved by :func:`save_coder`; damage of any kind raises :class:`CoderFileError`."""
    return load_module_folder(path, read_coder_meta, CoderConfig, SparseCoder, map_location)
