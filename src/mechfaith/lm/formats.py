"""Coder file formats of other tools: SAELens folders and the released GPT-2 transcoders.

SAELens layout (a folder with ``cfg.json`` and ``sae_weights.safetensors``):
    tensors ``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_out], ``b_dec``; ``threshold``
    [d_sae] for JumpReLU; ``W_skip`` [d_out, d_in] (transposed w.r.t. ours) for skip transcoders.
    ``cfg.json`` (SAELens v6 style) holds ``architecture`` (standard / topk / jumprelu / transcoder /
    skip_transcoder / jumprelu_transcoder; TopK transcoders, which SAELens lacks, are written as
    ``topk_transcoder`` / ``topk_skip_transcoder``), ``d_in``, ``d_sae``, ``d_out``, ``k``, ``apply_b_dec_to_input`` (false),
    ``normalize_activations`` ("none") and ``metadata`` with ``hook_name`` / ``hook_name_out``
    (TransformerLens names) plus a ``mechfaith`` entry holding our exact config and sites, which
    makes export -> import lossless. Importing also reads flat pre-v6 configs
    (``activation_fn_str``, ``activation_fn_kwargs``, ``hook_point``), folds
    ``apply_b_dec_to_input`` into ``b_enc`` and refuses activation normalisation.

Released GPT-2 transcoders (Dunefsky et al., ``pchlenski/gpt2-transcoders``): files
``final_sparse_autoencoder_gpt2-small_blocks.{L}.ln2.hook_normalized_24576.pt``, a ``torch.save``
zip of ``{"cfg": LanguageModelSAERunnerConfig, "state_dict": {W_enc [768, 24576], b_enc, W_dec
[24576, 768], b_dec [768], b_dec_out [768]}}`` computing ``relu((x - b_dec) W_enc + b_enc) W_dec +
b_dec_out``. They are read with a restricted unpickler (never ``torch.load``): only tensor-rebuild
functions, storage types, dtypes, ``torch.device``, ``OrderedDict`` and plain containers are
accepted; the config's class becomes a plain dict; a call to anything else (``os.system``...)
is refused before anything runs. Convention mapping: the transcoders were trained on
TransformerLens-processed GPT-2 (LayerNorm folded into the next weights, writing weights centred),
so on a Hugging Face GPT-2 their input is ``mlp_in_normalized`` (ln_2's input normalised, before
its affine) and their output is ``mlp_out_centered`` (the MLP output minus its mean over d_model),
which may replace ``mlp_out`` directly because every reader of the residual stream is a LayerNorm.
``b_dec`` is folded into the encoder bias: ``b_enc' = b_enc - b_dec W_enc``.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechfaith.atomic import atomic_dir
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_json, read_tensors, write_tensors
from mechfaith.configs import config_from_dict, config_to_dict
from mechfaith.errors import CoderFileError, ConfigError, MechfaithError
from mechfaith.jsonio import write_json

log = logging.getLogger(__name__)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
_SITE_TO_HOOK = {"resid_pre": "hook_resid_pre", "mlp_in": "ln2.hook_normalized",
                 "mlp_in_normalized": "ln2.hook_normalized", "mlp_out": "hook_mlp_out",
                 "mlp_out_centered": "hook_mlp_out", "resid_post": "hook_resid_post"}
_HOOK_TO_SITE = {"hook_resid_pre": "resid_pre", "ln2.hook_normalized": "mlp_in_normalized",
                 "hook_mlp_in": "mlp_in", "hook_mlp_out": "mlp_out", "hook_resid_post": "resid_post",
                 "hook_resid_mid": "resid_pre"}


class UnsafePickleError(MechfaithError):
    """A pickle asked for something outside the allowed set; nothing from it was run."""


@dataclass
class ImportedCoder:
    """A coder read from another tool's files, with where it belongs in the model."""

    coder: SparseCoder
    layer: int | None
    input_site: str | None
    output_site: str | None
    source: dict[str, Any] = field(default_factory=dict)  # the original config, as plain data


def parse_hook(name: str | None) -> tuple[int | None, str | None]:
    """(layer, site) from a TransformerLens hook name like ``blocks.8.ln2.hook_normalized``."""
    if not name:
        return None, None
    m = re.match(r"blocks\.(\d+)\.(.+)$", name)
    if not m:
        return None, None
    return int(m.group(1)), _HOOK_TO_SITE.get(m.group(2))


# ---------------------------------------------------------------------- SAELens
def _saelens_architecture(cfg: CoderConfig) -> str:
    tc = cfg.kind == "transcoder"
    if cfg.skip:
        if cfg.activation == "topk" and tc:
            return "topk_skip_transcoder"  # not in SAELens; mechfaith reads it back losslessly
        if cfg.activation != "relu" or not tc:
            raise ConfigError(f"SAELens has no {cfg.activation} coder with a skip connection "
                              f"(only ReLU skip transcoders)")
        return "skip_transcoder"
    if cfg.activation == "relu":
        return "transcoder" if tc else "standard"
    if cfg.activation in ("jumprelu", "batchtopk"):
        return "jumprelu_transcoder" if tc else "jumprelu"
    return "topk_transcoder" if tc else "topk"


def export_saelens(coder: SparseCoder, folder: str | os.PathLike[str], *, layer: int | None = None,
                   input_site: str = "mlp_in", output_site: str = "mlp_out", model_name: str = "",
                   extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write ``coder`` as a SAELens folder (replaced whole, atomically)."""
    cfg = coder.cfg
    arch = _saelens_architecture(cfg)
    sd = {k: v.detach().float().cpu() for k, v in coder.state_dict().items()}
    tensors = {"W_enc": sd["W_enc"], "b_enc": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    if cfg.skip:
        tensors["W_skip"] = sd["W_skip"].T.contiguous()
    if cfg.activation == "jumprelu":
        tensors["threshold"] = sd["log_threshold"].exp()
    elif cfg.activation == "batchtopk":
        theta = float(sd["batchtopk_threshold"])
        if theta < 0:
            raise ConfigError("this BatchTopK coder has no inference threshold yet (train it first)")
        tensors["threshold"] = torch.full((cfg.n_latents,), theta)
    if arch.startswith("topk_"):
        log.warning("SAELens has no TopK transcoder; writing architecture 'topk_transcoder' "
                    "(readable by mechfaith, not by SAELens)")
    hook_in = f"blocks.{layer}.{_SITE_TO_HOOK.get(input_site, input_site)}" if layer is not None else ""
    hook_out = f"blocks.{layer}.{_SITE_TO_HOOK.get(output_site, output_site)}" if layer is not None else ""
    meta: dict[str, Any] = {"model_name": model_name, "hook_name": hook_in, "hook_layer": layer,
                            "hook_head_index": None, "prepend_bos": True,
                            "mechfaith": {"config": config_to_dict(cfg), "layer": layer,
                                          "input_site": input_site, "output_site": output_site}}
    meta.update(extra_metadata or {})
    cfg_json: dict[str, Any] = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents,
                                "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
                                "normalize_activations": "none", "reshape_activations": "none",
                                "metadata": meta}
    if cfg.kind == "transcoder":
        cfg_json.update({"d_out": cfg.d_out, "hook_name_out": hook_out, "hook_layer_out": layer,
                         "hook_head_index_out": None})
    if cfg.activation == "topk":
        cfg_json["k"] = cfg.k
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_tensors(tmp / SAELENS_WEIGHTS, tensors)
        write_json(tmp / SAELENS_CFG, cfg_json)
    return folder


def import_saelens(folder: str | os.PathLike[str]) -> ImportedCoder:
    """Read a SAELens folder into a :class:`SparseCoder` (see the module docstring)."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    cfg_path = folder / SAELENS_CFG
    if not cfg_path.is_file():
        raise CoderFileError(folder, f"no {SAELENS_CFG}: not a SAELens folder")
    raw = read_json(cfg_path)
    if not isinstance(raw, dict):
        raise CoderFileError(cfg_path, "expected a JSON object")
    tensors = read_tensors(folder / SAELENS_WEIGHTS)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if name not in tensors:
            raise CoderFileError(folder / SAELENS_WEIGHTS, f"tensor {name} is missing")
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    ours = meta.get("mechfaith") if isinstance(meta.get("mechfaith"), dict) else None
    norm = raw.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise CoderFileError(cfg_path, f"normalize_activations = {norm!r} is not supported "
                                       f"(fold the scaling into the weights first)")
    W_enc, b_enc = tensors["W_enc"].float(), tensors["b_enc"].float()
    W_dec, b_dec = tensors["W_dec"].float(), tensors["b_dec"].float()
    d_in, n = W_enc.shape
    d_out = W_dec.shape[1]
    if W_dec.shape[0] != n or b_enc.shape != (n,) or b_dec.shape != (d_out,):
        raise CoderFileError(folder / SAELENS_WEIGHTS, f"inconsistent shapes: W_enc {tuple(W_enc.shape)}, "
                                                      f"W_dec {tuple(W_dec.shape)}, b_enc {tuple(b_enc.shape)}, "
                                                      f"b_dec {tuple(b_dec.shape)}")
    if ours is not None:
        try:
            cfg = config_from_dict(CoderConfig, ours["config"])
        except (ConfigError, KeyError) as exc:
            raise CoderFileError(cfg_path, f"bad mechfaith config: {exc}") from None
        layer, input_site, output_site = ours.get("layer"), ours.get("input_site"), ours.get("output_site")
    else:
        arch = raw.get("architecture") or ("topk" if raw.get("activation_fn_str") == "topk" else "standard")
        kwargs = raw.get("activation_fn_kwargs") or {}
        k = raw.get("k", kwargs.get("k", 32))
        activation = {"standard": "relu", "transcoder": "relu", "skip_transcoder": "relu",
                      "topk": "topk", "topk_transcoder": "topk", "topk_skip_transcoder": "topk",
                      "batchtopk": "jumprelu",
                      "jumprelu": "jumprelu", "jumprelu_transcoder": "jumprelu"}.get(arch)
        if activation is None:
            raise CoderFileError(cfg_path, f"SAELens architecture {arch!r} is not supported")
        kind = "transcoder" if ("transcoder" in arch or d_out != d_in or raw.get("hook_name_out")) else "sae"
        try:
            cfg = CoderConfig(d_in=d_in, n_latents=n, d_out=d_out, kind=kind, activation=activation,
                              k=int(k) if activation == "topk" else 32, skip="W_skip" in tensors)
        except ConfigError as exc:
            raise CoderFileError(cfg_path, str(exc)) from None
        hook_in = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
        hook_out = raw.get("hook_name_out") or meta.get("hook_name_out") or raw.get("out_hook_point")
        layer, input_site = parse_hook(hook_in)
        _, output_site = parse_hook(hook_out) if hook_out else (None, None)
        if kind == "sae":
            output_site = input_site
        if raw.get("apply_b_dec_to_input", False) and kind == "sae":
            b_enc = b_enc - (b_dec.double() @ W_enc.double()).float()
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    coder = SparseCoder(cfg)
    if cfg.skip:
        state["W_skip"] = tensors["W_skip"].float().T.contiguous()
    if cfg.activation == "jumprelu":
        if "threshold" not in tensors:
            raise CoderFileError(folder / SAELENS_WEIGHTS, "JumpReLU coder without a threshold tensor")
        state["log_threshold"] = tensors["threshold"].float().clamp_min(1e-30).log()
    state["batchtopk_threshold"] = coder.batchtopk_threshold
    if cfg.activation == "batchtopk" and "threshold" in tensors:
        theta = tensors["threshold"].float()
        if not torch.allclose(theta, theta[:1].expand_as(theta)):
            raise CoderFileError(folder / SAELENS_WEIGHTS, "a BatchTopK coder needs one shared threshold")
        state["batchtopk_threshold"] = theta[0].clone()
    expected = coder.state_dict()
    for name, t in state.items():
        if name in expected and t.shape != expected[name].shape:
            raise CoderFileError(folder / SAELENS_WEIGHTS, f"tensor {name} has shape {tuple(t.shape)}, "
                                                          f"expected {tuple(expected[name].shape)}")
    coder.load_state_dict(state)
    return ImportedCoder(coder.eval(), layer, input_site, output_site, raw)


# ---------------------------------------------------------------------- restricted unpickling
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


# ---------------------------------------------------------------------- released GPT-2 transcoders
_LEGACY_NAME = re.compile(r"blocks\.(\d+)\.ln2\.hook_normalized")


def import_gpt2_transcoder(path: str | os.PathLike[str]) -> ImportedCoder:
    """Read a released GPT-2 transcoder ``.pt`` (see the module docstring for the convention)."""
    path = Path(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CoderFileError(path, "expected a dict with 'cfg' and 'state_dict'")
    sd, cfg = obj["state_dict"], obj.get("cfg") or {}
    if not isinstance(sd, dict):
        raise CoderFileError(path, "'state_dict' is not a mapping")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"):
        if not isinstance(sd.get(name), Tensor):
            raise CoderFileError(path, f"state_dict has no tensor {name!r}")
    W_enc, b_enc, W_dec = sd["W_enc"].double(), sd["b_enc"].double(), sd["W_dec"].double()
    b_dec, b_dec_out = sd["b_dec"].double(), sd["b_dec_out"].double()
    d_in, n = W_enc.shape
    d_out = W_dec.shape[1]
    if W_dec.shape[0] != n or b_enc.shape != (n,) or b_dec.shape != (d_in,) or b_dec_out.shape != (d_out,):
        raise CoderFileError(path, "tensor shapes are inconsistent")
    coder = SparseCoder(CoderConfig(d_in=d_in, n_latents=n, d_out=d_out, kind="transcoder", activation="relu"))
    with torch.no_grad():
        coder.W_enc.copy_(W_enc.float())
        coder.b_enc.copy_((b_enc - b_dec @ W_enc).float())
        coder.W_dec.copy_(W_dec.float())
        coder.b_dec.copy_(b_dec_out.float())
    layer = None
    hook = cfg.get("hook_point") if isinstance(cfg, dict) else None
    m = _LEGACY_NAME.search(str(hook or "")) or _LEGACY_NAME.search(path.name)
    if m:
        layer = int(m.group(1))
    source = {k: v for k, v in cfg.items() if not isinstance(v, Tensor)} if isinstance(cfg, dict) else {}
    return ImportedCoder(coder.eval(), layer, "mlp_in_normalized", "mlp_out_centered", source)
