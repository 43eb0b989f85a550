"""SAELens coder folders: export and import, and the :class:`ImportedCoder` every importer returns.

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

:class:`ImportedCoder` (a coder with the layer and sites it belongs to) is also what the released
GPT-2 transcoders' importer (:mod:`mechfaith.lm.gpt2_transcoders`) returns; :func:`parse_hook`
reads a TransformerLens hook name.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechfaith.atomic import atomic_dir
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_json, read_tensors, write_tensors
from mechfaith.configs import config_from_dict, config_to_dict
from mechfaith.errors import CoderFileError, ConfigError
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
    meta: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
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
