"""Reading dictionary_learning's (saprmarks) saved dictionaries into coders that compute exactly what
the library computes from them.

Its ``trainSAE`` writes ``ae.pt`` (``torch.save`` of the dictionary's ``state_dict``; checkpoints
``checkpoints/ae_<step>.pt``) and ``config.json`` (``{"trainer": {"dict_class", "activation_dim",
"dict_size", "k", "layer", "lm_name", "submodule_name", ...}, "buffer": ...}``). The file is read
with ``torch.load(weights_only=True)`` only (tensors and plain containers: never full unpickling).
With ``normalize_activations`` the library scales the biases back before saving, so the file works
on raw activations (``norm_factor`` changes nothing here).

The dictionaries (tensors, and what the library's ``encode`` / ``forward`` compute):

- ``AutoEncoder`` (standard): ``encoder.weight`` [dict_size, activation_dim], ``encoder.bias``,
  ``decoder.weight`` [activation_dim, dict_size], ``bias`` [activation_dim];
  ``relu(encoder(x - bias))``, ``decoder(f) + bias``. (Its ``from_pretrained`` rescales the decoder
  to unit norm by default, which changes the latents' scale but not the output; mechfaith reads the
  file as saved.)
- ``AutoEncoderTopK``: the same encoder and decoder, ``b_dec`` [activation_dim] for ``bias``, and
  buffers ``k`` (int) and ``threshold`` (a scalar its default ``encode`` does not use): the ``k``
  largest of ``relu(encoder(x - b_dec))``.
- ``BatchTopKSAE``: the same tensors; its default ``encode`` keeps ``relu(pre)`` above ``threshold``
  (mechfaith's BatchTopK at inference). A ``threshold`` below 0 (never estimated) keeps every
  positive latent: read as a ReLU coder, as that is what the library computes.
- ``JumpReluAutoEncoder``: ``W_enc`` [activation_dim, dict_size], ``b_enc``, ``W_dec`` [dict_size,
  activation_dim], ``b_dec``, ``threshold`` [dict_size]; ``relu(pre * (pre > threshold))`` with
  ``pre = x W_enc + b_enc`` (``apply_b_dec_to_input`` is not saved and false when loaded from a
  file). Thresholds must be positive (mechfaith keeps their logarithm).

``b_dec`` subtracted before encoding is folded into the encoder bias (``b_enc - b_dec W_enc``).
AutoEncoderTopK and BatchTopKSAE save the same tensors: ``config.json``'s ``dict_class`` tells them
apart (refused without it). Refused in one line naming it: ``GatedAutoEncoder`` (separate gate and
magnitude encoders), ``MatryoshkaBatchTopKSAE`` and anything else.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_json
from mechfaith.coders.validate import check_fields, check_tensor, require_dict
from mechfaith.errors import CoderFileError, ConfigError, MechfaithError
from mechfaith.lm.saelens_format import ImportedCoder

log = logging.getLogger(__name__)

DL_WEIGHTS = "ae.pt"
DL_CONFIG = "config.json"
CHECKPOINT = re.compile(r"ae(_\d+)?\.pt")  # ae.pt, checkpoints/ae_<step>.pt
READ_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")
REFUSED_CLASSES = {
    "GatedAutoEncoder": "separate gate and magnitude encoders (a mechfaith coder has one encoder)",
    "MatryoshkaBatchTopKSAE": "nested Matryoshka groups (not read yet)",
}
LINEAR_KEYS = {"AutoEncoder": {"encoder.weight", "encoder.bias", "decoder.weight", "bias"},
               "topk": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}}
JUMPRELU_KEYS = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
GATED_KEYS = {"decoder_bias", "r_mag", "gate_bias", "mag_bias"}


def is_dictionary_learning_file(path: str | Path) -> bool:
    """Whether ``path`` is named as dictionary_learning names its saved dictionaries."""
    return CHECKPOINT.fullmatch(Path(path).name) is not None


def load_state(path: Path) -> dict[str, Tensor]:
    """``ae.pt`` read with ``torch.load(weights_only=True)``: a mapping of names to tensors."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CoderFileError(path, f"not a state_dict torch.load(weights_only=True) can read ({first})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise CoderFileError(path, "expected a state_dict (a mapping of names to tensors)")
    return dict(sd)


def dict_class(sd: dict[str, Tensor], trainer: dict[str, Any], path: Path) -> str:
    """The dictionary's class, from ``config.json`` or, where unambiguous, its tensors."""
    named = trainer.get("dict_class")
    if isinstance(named, str):
        if named in REFUSED_CLASSES:
            raise CoderFileError(path, f"dict_class {named} is not supported: {REFUSED_CLASSES[named]}; mechfaith "
                                       f"reads {', '.join(READ_CLASSES)}")
        if named not in READ_CLASSES:
            raise CoderFileError(path, f"unknown dict_class {named!r}; mechfaith reads {', '.join(READ_CLASSES)}")
        return named
    keys = set(sd)
    if GATED_KEYS <= keys:
        raise CoderFileError(path, f"a GatedAutoEncoder is not supported: {REFUSED_CLASSES['GatedAutoEncoder']}")
    if keys == LINEAR_KEYS["AutoEncoder"]:
        return "AutoEncoder"
    if keys == JUMPRELU_KEYS:
        return "JumpReluAutoEncoder"
    if keys == LINEAR_KEYS["topk"]:
        raise CoderFileError(path, f"AutoEncoderTopK and BatchTopKSAE save the same tensors and there is no "
                                   f"{DL_CONFIG} (its trainer.dict_class) to tell them apart")
    raise CoderFileError(path, f"tensors {', '.join(sorted(keys))} are not a dictionary mechfaith reads "
                               f"({', '.join(READ_CLASSES)})")


def _expect(sd: dict[str, Tensor], want: dict[str, tuple[int, ...]], path: Path) -> None:
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra
                                                                           else [])
        raise CoderFileError(path, f"tensor(s) {'; '.join(parts)} for this dictionary")
    for name, shape in want.items():
        if name == "k":
            continue
        check_tensor(path, name, sd[name], shape=shape)


def _k(sd: dict[str, Tensor], n: int, path: Path) -> int:
    k = sd["k"]
    if k.numel() != 1 or k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
        raise CoderFileError(path, f"buffer k must be one whole number, got a {k.dtype} of shape {tuple(k.shape)}")
    value = int(k.item())
    if not 1 <= value <= n:
        raise CoderFileError(path, f"k = {value} is not between 1 and dict_size = {n}")
    return value


def dictionary_state(cls: str, sd: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], str, int, float]:
    """mechfaith's tensors (float32; ``b_dec`` folded where subtracted), activation, k, threshold."""
    if cls == "JumpReluAutoEncoder":
        d, n = sd["W_enc"].shape if sd.get("W_enc") is not None and sd["W_enc"].dim() == 2 else (0, 0)
        _expect(sd, {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "threshold": (n,)}, path)
        theta = sd["threshold"].double()
        if bool((theta <= 0).any()):
            raise CoderFileError(path, f"JumpReLU threshold {float(theta.min()):.3g} is not positive (mechfaith "
                                       "keeps each threshold's logarithm)")
        state = {"W_enc": sd["W_enc"].double(), "b_enc": sd["b_enc"].double(), "W_dec": sd["W_dec"].double(),
                 "b_dec": sd["b_dec"].double(), "log_threshold": theta.log()}
        return {k: v.float().contiguous() for k, v in state.items()}, "jumprelu", 0, 0.0
    bias = "bias" if cls == "AutoEncoder" else "b_dec"
    w = sd.get("encoder.weight")
    n, d = tuple(w.shape) if w is not None and w.dim() == 2 else (0, 0)
    want: dict[str, tuple[int, ...]] = {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n),
                                        bias: (d,)}
    if cls != "AutoEncoder":
        want.update(k=(), threshold=())
    _expect(sd, want, path)
    W_enc = sd["encoder.weight"].double().T
    b_dec = sd[bias].double()
    state = {"W_enc": W_enc, "b_enc": sd["encoder.bias"].double() - b_dec @ W_enc,
             "W_dec": sd["decoder.weight"].double().T, "b_dec": b_dec}
    state = {k: v.float().contiguous() for k, v in state.items()}
    if cls == "AutoEncoder":
        return state, "relu", 0, 0.0
    k, thr = _k(sd, n, path), float(sd["threshold"].item())
    if cls == "AutoEncoderTopK":
        return state, "topk", k, thr
    if thr < 0:
        log.info("%s: BatchTopK threshold %s was never estimated: the library keeps every positive latent (ReLU)",
                 path, thr)
        return state, "relu", k, thr
    return state, "batchtopk", k, thr


def _trainer(folder: Path) -> dict[str, Any]:
    """``config.json``'s ``trainer`` entry (empty when there is no config.json)."""
    path = folder / DL_CONFIG
    if not path.is_file():
        return {}
    data = require_dict(path, read_json(path))
    check_fields(path, data, {"trainer": "dict"})
    trainer = data.get("trainer") or {}
    check_fields(path, trainer, {"dict_class": "str", "activation_dim": "int", "dict_size": "int", "k": "int",
                                 "layer": "int|null", "lm_name": "str|null", "submodule_name": "str|null"})
    return dict(trainer)


def locate(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(``ae.pt``, the folder whose ``config.json`` describes it) for a folder or a saved file."""
    p = Path(path)
    weights = p / DL_WEIGHTS if p.is_dir() else p
    if not weights.is_file():
        raise CoderFileError(weights, "no such file: not a dictionary_learning folder")
    folder = weights.parent
    if folder.name == "checkpoints" and not (folder / DL_CONFIG).is_file():
        folder = folder.parent
    return weights, folder


def import_dictionary_learning(path: str | os.PathLike[str]) -> ImportedCoder:
    """Read a dictionary_learning ``ae.pt`` (or its folder) into a :class:`SparseCoder` computing
    what the library computes (module docstring); a :class:`CoderFileError` otherwise."""
    weights, folder = locate(path)
    trainer = _trainer(folder)
    sd = load_state(weights)
    cls = dict_class(sd, trainer, weights)
    state, activation, k, thr = dictionary_state(cls, sd, weights)
    n, d = state["W_dec"].shape
    for key, value in (("activation_dim", d), ("dict_size", n)):
        if key in trainer and trainer[key] != value:
            raise CoderFileError(folder / DL_CONFIG, f"{key} = {trainer[key]} disagrees with {weights.name} ({value})")
    try:
        cfg = CoderConfig(d_in=d, n_latents=n, d_out=d, kind="sae", activation=activation, k=k or 1,
                          decoder_norm="penalty")
    except (ConfigError, MechfaithError) as exc:
        raise CoderFileError(weights, str(exc)) from None
    coder = SparseCoder(cfg)
    state["batchtopk_threshold"] = torch.tensor(thr if activation == "batchtopk" else -1.0)
    coder.load_state_dict(state)
    source = {"dict_class": cls, **{k: v for k, v in trainer.items() if isinstance(v, (str, int, float, bool))}}
    return ImportedCoder(coder.eval(), trainer.get("layer"), None, None, source, trainer.get("lm_name"))
