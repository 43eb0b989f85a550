"""Reading a sparsify folder (``cfg.json`` + ``sae.safetensors``) into a coder that computes exactly
what sparsify computes from it (:mod:`mechfaith.lm.sparsify_format` describes the format).

- SAEs: sparsify encodes ``x - b_dec``; that is folded into the encoder bias
  (``b_enc = encoder.bias - b_dec W_enc``). Transcoders (``transcode``) encode ``x`` as it is.
- TopK: sparsify takes the ``k`` largest of ``relu(pre)``, mechfaith the ``k`` largest of ``pre``
  then ReLU: the same latents.
- ``skip_connection``: ``W_skip`` [d_in, d_in] (sparsify applies ``x @ W_skip.T``) becomes
  mechfaith's ``W_skip`` (its transpose); on an SAE it reads the input itself, as in sparsify.
- ``multi_topk``: a training loss (sparsify's forward then also decodes the ``4 k`` largest
  latents, for the loss); the coder is its TopK ``k`` coder, what ``encode`` and ``decode`` compute.
- ``normalize_decoder``: a training choice (sparsify keeps an SAE's decoder rows at unit norm while
  training; it ignores the flag for transcoders); read as ``decoder_norm`` "unit" for such an SAE,
  "penalty" otherwise; it changes nothing computed.
- Refused in one line naming it: ``activation`` "groupmax", ``signed`` true (older sparsify:
  negative latents), unknown tensors, shapes that disagree with ``cfg.json``.

A ``mechfaith`` entry in the safetensors header (written by :mod:`mechfaith.lm.sparsify_write`)
restores our exact config, layer, sites and model name when it agrees with the file; otherwise
the folder's name, a sparsify hookpoint, gives the layer and sites
(:func:`~mechfaith.lm.sparsify_format.parse_hookpoint`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_json, read_tensors
from mechfaith.coders.validate import check_fields, require_dict
from mechfaith.configs import config_from_dict
from mechfaith.errors import CoderFileError, ConfigError, InputError
from mechfaith.jsonio import loads_json
from mechfaith.lm.saelens_format import ImportedCoder
from mechfaith.lm.sparsify_format import (
    CFG_FIELDS,
    CFG_KINDS,
    HARMLESS_FIELDS,
    META_KEY,
    READ_ACTIVATIONS,
    REFUSED_ACTIVATIONS,
    SPARSIFY_CFG,
    SPARSIFY_WEIGHTS,
    parse_hookpoint,
)

log = logging.getLogger(__name__)


@dataclass
class SparsifyHeader:
    """What a sparsify folder says without reading its weights: its config (sparsify's defaults
    filled in), where it sits (from our entry, else the folder's name), and our entry."""

    cfg: dict[str, Any]
    layer: int | None
    input_site: str | None
    output_site: str | None
    model_name: str | None
    ours: dict[str, Any] | None


def sparsify_cfg(folder: Path) -> dict[str, Any]:
    """``cfg.json`` checked and completed with sparsify's defaults; refused in one line naming the
    setting mechfaith cannot compute."""
    path = folder / SPARSIFY_CFG
    raw = require_dict(path, read_json(path))
    check_fields(path, raw, CFG_KINDS, required=("d_in",))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": 0, "k": 32,
           "multi_topk": False, "skip_connection": False, "transcode": False, **raw}
    act = cfg["activation"]
    if act in REFUSED_ACTIVATIONS:
        raise CoderFileError(path, f"activation {act!r} is not supported: {REFUSED_ACTIVATIONS[act]}; mechfaith "
                                   f"reads activation {', '.join(map(repr, READ_ACTIVATIONS))}")
    if act not in READ_ACTIVATIONS:
        raise CoderFileError(path, f"unknown sparsify activation {act!r}; mechfaith reads "
                                   f"{', '.join(map(repr, READ_ACTIVATIONS))}")
    if cfg.get("signed"):
        raise CoderFileError(path, "signed = true is not supported (latents of either sign: no such mechfaith "
                                   "activation)")
    unknown = sorted(set(raw) - set(CFG_FIELDS) - {"signed"} - set(HARMLESS_FIELDS))
    if unknown:  # sparsify drops unknown fields too
        log.warning("%s: ignoring field(s) sparsify does not know: %s", path, ", ".join(unknown))
    for name in ("d_in", "k"):
        if cfg[name] < 1:
            raise CoderFileError(path, f"{name} = {cfg[name]} is not a positive whole number")
    if cfg["num_latents"] < 0 or (cfg["num_latents"] == 0 and cfg["expansion_factor"] < 1):
        raise CoderFileError(path, f"num_latents = {cfg['num_latents']} with expansion_factor = "
                                   f"{cfg['expansion_factor']} gives no latents")
    cfg["num_latents"] = cfg["num_latents"] or cfg["d_in"] * cfg["expansion_factor"]
    return cfg


def header_entry(weights: Path) -> dict[str, Any] | None:
    """Our ``mechfaith`` entry in the safetensors header (None when absent or unreadable: a
    damaged file is reported when its tensors are read)."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    text = meta.get(META_KEY)
    if not text:
        return None
    try:
        entry = loads_json(text)
    except InputError:
        log.warning("%s: ignoring an unreadable mechfaith entry", weights)
        return None
    return entry if isinstance(entry, dict) else None


def read_header(folder: str | os.PathLike[str]) -> SparsifyHeader:
    """The folder's config and place (module docstring), without reading its weights."""
    folder = Path(folder)
    cfg = sparsify_cfg(folder)
    ours = header_entry(folder / SPARSIFY_WEIGHTS)
    layer, input_site, output_site = parse_hookpoint(folder.resolve().name, cfg["transcode"])
    model = None
    if ours is not None:
        check_fields(folder / SPARSIFY_WEIGHTS, ours, {"layer": "int|null", "input_site": "str|null",
                                                      "output_site": "str|null", "model_name": "str|null",
                                                      "config": "dict|null"})
        layer, input_site, output_site = ours.get("layer"), ours.get("input_site"), ours.get("output_site")
        model = ours.get("model_name") or None
    return SparsifyHeader(cfg, layer, input_site, output_site, model, ours)


def _check_tensors(cfg: dict[str, Any], t: dict[str, Tensor], where: Path) -> None:
    d, n = cfg["d_in"], cfg["num_latents"]
    want = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
    if cfg["skip_connection"]:
        want["W_skip"] = (d, d)
    missing, extra = sorted(set(want) - set(t)), sorted(set(t) - set(want))
    if missing:
        raise CoderFileError(where, f"tensor(s) {', '.join(missing)} missing (skip_connection = "
                                    f"{str(cfg['skip_connection']).lower()})")
    if extra:
        raise CoderFileError(where, f"unexpected tensor(s) {', '.join(extra)} (skip_connection = "
                                    f"{str(cfg['skip_connection']).lower()})")
    for name, shape in want.items():
        if tuple(t[name].shape) != shape:
            raise CoderFileError(where, f"tensor {name} has shape {tuple(t[name].shape)}; cfg.json (d_in {d}, "
                                        f"num_latents {n}) implies {shape}")
    if cfg["k"] > n:
        raise CoderFileError(where, f"k = {cfg['k']} exceeds num_latents = {n}")


def sparsify_state(cfg: dict[str, Any], t: dict[str, Tensor]) -> dict[str, Tensor]:
    """sparsify's tensors under mechfaith's names and orientations, ``x - b_dec`` folded into
    ``b_enc`` for an SAE (float32)."""
    W_enc = t["encoder.weight"].double().T
    b_enc, W_dec, b_dec = (t[k].double() for k in ("encoder.bias", "W_dec", "b_dec"))
    if not cfg["transcode"]:
        b_enc = b_enc - b_dec @ W_enc  # sparsify encodes x - b_dec
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if cfg["skip_connection"]:
        state["W_skip"] = t["W_skip"].double().T  # sparsify: x @ W_skip.T
    return {k: v.float().contiguous() for k, v in state.items()}


def _config(header: SparsifyHeader, where: Path) -> CoderConfig:
    cfg = header.cfg
    try:
        derived = CoderConfig(d_in=cfg["d_in"], n_latents=cfg["num_latents"], d_out=cfg["d_in"],
                              kind="transcoder" if cfg["transcode"] else "sae", activation="topk", k=cfg["k"],
                              skip=bool(cfg["skip_connection"]),
                              decoder_norm="unit" if cfg["normalize_decoder"] and not cfg["transcode"] else "penalty")
    except ConfigError as exc:
        raise CoderFileError(where, str(exc)) from None
    ours = header.ours.get("config") if header.ours else None
    if not isinstance(ours, dict):
        return derived
    try:
        mine = config_from_dict(CoderConfig, ours)
    except ConfigError:
        log.warning("%s: ignoring the mechfaith entry: not a valid coder config", where)
        return derived
    same = (mine.d_in, mine.n_latents, mine.d_out, mine.kind, mine.activation, mine.k, mine.skip) == \
        (derived.d_in, derived.n_latents, derived.d_out, derived.kind, derived.activation, derived.k, derived.skip)
    if not same:
        log.warning("%s: ignoring the mechfaith entry: it disagrees with the file", where)
        return derived
    return mine


def import_sparsify(folder: str | os.PathLike[str]) -> ImportedCoder:
    """Read a sparsify folder into a :class:`SparseCoder` computing what sparsify computes (module
    docstring); a :class:`CoderFileError` naming what is refused otherwise."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    if not (folder / SPARSIFY_CFG).is_file():
        raise CoderFileError(folder, f"no {SPARSIFY_CFG}: not a sparsify folder")
    header = read_header(folder)
    weights = folder / SPARSIFY_WEIGHTS
    tensors = read_tensors(weights)
    _check_tensors(header.cfg, tensors, weights)
    cfg = _config(header, folder / SPARSIFY_CFG)
    coder = SparseCoder(cfg)
    state = sparsify_state(header.cfg, tensors)
    state["batchtopk_threshold"] = coder.batchtopk_threshold.detach().clone()
    coder.load_state_dict(state)
    raw = require_dict(folder / SPARSIFY_CFG, read_json(folder / SPARSIFY_CFG))
    return ImportedCoder(coder.eval(), header.layer, header.input_site, header.output_site, raw, header.model_name)
