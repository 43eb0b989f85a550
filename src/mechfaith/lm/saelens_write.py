"""Writing a coder as a SAELens 6 folder (``cfg.json`` + ``sae_weights.safetensors``) that SAELens's
``SAE.load_from_disk`` loads with its hook and model names.

Architectures written (SAELens's own names): ReLU SAE ``standard``, TopK SAE ``topk``, JumpReLU SAE
``jumprelu``, ReLU transcoder ``transcoder`` / ``skip_transcoder``, JumpReLU transcoder
``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``; a BatchTopK coder is written as a JumpReLU
one with its inference threshold on every latent (as SAELens itself saves BatchTopK SAEs), and an
SAE with a skip connection as a skip transcoder with ``d_out == d_in``. SAELens has no TopK
transcoder: one is refused (:class:`ConfigError`) before anything is written.

``cfg.json`` has exactly the fields SAELens 6 writes for that architecture, with
``apply_b_dec_to_input`` false, ``normalize_activations`` "none", ``rescale_acts_by_decoder_norm``
false, and ``metadata`` holding ``sae_lens_version`` (:data:`SAELENS_FORMAT_VERSION`), the model and
TransformerLens hook names (``hook_name``, ``hook_name_out`` for transcoders) and a ``mechfaith``
entry (our exact config and sites, so export -> import is lossless).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechfaith.atomic import atomic_dir
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import write_tensors
from mechfaith.configs import config_to_dict
from mechfaith.errors import ConfigError
from mechfaith.jsonio import write_json
from mechfaith.lm.saelens_format import SAELENS_CFG, SAELENS_FORMAT_VERSION, SAELENS_WEIGHTS, hook_name


def saelens_architecture(cfg: CoderConfig) -> str:
    """The SAELens architecture that computes exactly what a coder of ``cfg`` computes; a
    :class:`ConfigError` when SAELens has none (TopK transcoders, TopK coders with a skip)."""
    transcoder = cfg.kind == "transcoder" or cfg.skip
    if cfg.activation == "topk":
        if transcoder:
            what = "TopK transcoder" if cfg.kind == "transcoder" else "TopK SAE with a skip connection"
            raise ConfigError(f"SAELens has no {what} (its TopK architecture is an SAE without a skip "
                              f"connection, reading and writing one site); nothing written")
        return "topk"
    prefix = "" if cfg.activation == "relu" else "jumprelu_"  # BatchTopK at inference is a JumpReLU
    if cfg.skip:
        return prefix + "skip_transcoder"
    if transcoder:
        return prefix + "transcoder"
    return "jumprelu" if prefix else "standard"


def saelens_tensors(coder: SparseCoder) -> dict[str, Tensor]:
    """The coder's tensors under SAELens's names and orientations (``W_skip`` [d_out, d_in],
    JumpReLU ``threshold`` [d_sae]); a :class:`ConfigError` for a BatchTopK coder with no inference
    threshold yet."""
    cfg = coder.cfg
    sd = {k: v.detach().float().cpu() for k, v in coder.state_dict().items()}
    tensors = {"W_enc": sd["W_enc"], "b_enc": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    if cfg.skip:
        tensors["W_skip"] = sd["W_skip"].T.contiguous()
    if cfg.activation == "jumprelu":
        tensors["threshold"] = sd["log_threshold"].exp()
    elif cfg.activation == "batchtopk":
        theta = float(sd["batchtopk_threshold"])
        if theta < 0:
            raise ConfigError("this BatchTopK coder has no inference threshold yet (train it first); nothing written")
        tensors["threshold"] = torch.full((cfg.n_latents,), theta)
    return tensors


def check_saelens_exportable(coder: SparseCoder) -> str:
    """The SAELens architecture ``coder`` is written as; a :class:`ConfigError` if SAELens cannot
    hold it (nothing is written then)."""
    arch = saelens_architecture(coder.cfg)
    saelens_tensors(coder)
    return arch


def saelens_cfg(coder: SparseCoder, *, layer: int | None = None, input_site: str = "mlp_in",
                output_site: str = "mlp_out", model_name: str | None = None,
                extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg.json`` as SAELens 6 writes it for the coder's architecture (see the module docstring)."""
    cfg = coder.cfg
    arch = saelens_architecture(cfg)
    transcoder = arch.endswith("transcoder")
    meta: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                            "model_name": model_name or None, "hook_name": hook_name(layer, input_site),
                            "hook_head_index": None, "prepend_bos": True}
    if transcoder:
        meta["hook_name_out"] = hook_name(layer, output_site if cfg.kind == "transcoder" else input_site)
        meta["hook_head_index_out"] = None
    meta["mechfaith"] = {"config": config_to_dict(cfg), "layer": layer, "input_site": input_site,
                         "output_site": output_site}
    meta.update(extra_metadata or {})
    out: dict[str, Any] = {"d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": False, "normalize_activations": "none",
                           "reshape_activations": "none", "metadata": meta}
    if transcoder:
        out["d_out"] = cfg.d_out
    if arch == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    out["architecture"] = arch
    return out


def export_saelens(coder: SparseCoder, folder: str | os.PathLike[str], *, layer: int | None = None,
                   input_site: str = "mlp_in", output_site: str = "mlp_out", model_name: str | None = "",
                   extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write ``coder`` as a SAELens folder (replaced whole, atomically); a :class:`ConfigError`
    before anything is written when SAELens cannot hold it."""
    saelens_architecture(coder.cfg)
    tensors = saelens_tensors(coder)
    cfg_json = saelens_cfg(coder, layer=layer, input_site=input_site, output_site=output_site,
                           model_name=model_name, extra_metadata=extra_metadata)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_tensors(tmp / SAELENS_WEIGHTS, tensors)
        write_json(tmp / SAELENS_CFG, cfg_json)
    return folder
