"""Writing a coder as a sparsify folder (``cfg.json`` + ``sae.safetensors``) that sparsify's
``SparseCoder.load_from_disk`` loads and computes exactly as mechfaith does.

sparsify holds TopK coders only, whose output has the input's width: TopK SAEs (with or without a
skip connection) and TopK transcoders with ``d_out == d_in`` (with or without a skip). Any other
coder (ReLU, JumpReLU, BatchTopK; a transcoder with ``d_out != d_in``) is refused
(:class:`ConfigError`) before anything is written.

``cfg.json`` has exactly the fields sparsify writes (``multi_topk`` false, ``normalize_decoder``
true for an SAE whose ``decoder_norm`` is "unit" and, as sparsify's default, for a transcoder, whose
training ignores it); an SAE's ``b_dec`` is folded out of the encoder
bias (sparsify encodes ``x - b_dec``). The safetensors header holds a ``mechfaith`` entry (our
exact config, layer, sites, model name: sparsify ignores it) so that export -> import is lossless.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from mechfaith.atomic import atomic_dir
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import write_tensors
from mechfaith.configs import config_to_dict
from mechfaith.errors import ConfigError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.sparsify_format import META_KEY, SPARSIFY_CFG, SPARSIFY_WEIGHTS


def check_sparsify_exportable(cfg: CoderConfig) -> None:
    """A :class:`ConfigError` (nothing written) unless sparsify can hold a coder of ``cfg``."""
    if cfg.activation != "topk":
        raise ConfigError(f"sparsify has TopK coders only: a {cfg.activation} {cfg.kind} cannot be written "
                          f"as a sparsify folder; nothing written")
    if cfg.d_out != cfg.d_in:
        raise ConfigError(f"a sparsify transcoder's output has its input's width: this {cfg.kind} maps {cfg.d_in} "
                          f"to {cfg.d_out} dimensions; nothing written")


def sparsify_tensors(coder: SparseCoder) -> dict[str, Tensor]:
    """The coder's tensors under sparsify's names and orientations (module docstring)."""
    cfg = coder.cfg
    sd = {k: v.detach().double().cpu() for k, v in coder.state_dict().items()}
    bias = sd["b_enc"] if cfg.kind == "transcoder" else sd["b_enc"] + sd["b_dec"] @ sd["W_enc"]
    tensors = {"encoder.weight": sd["W_enc"].T, "encoder.bias": bias, "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    if cfg.skip:
        tensors["W_skip"] = sd["W_skip"].T  # sparsify: x @ W_skip.T
    return {k: v.float().contiguous() for k, v in tensors.items()}


def sparsify_cfg(cfg: CoderConfig) -> dict[str, Any]:
    """``cfg.json`` as sparsify writes it for a coder of ``cfg``."""
    n, d = cfg.n_latents, cfg.d_in
    return {"activation": "topk", "expansion_factor": n // d if n % d == 0 else 32,
            "normalize_decoder": cfg.decoder_norm == "unit" or cfg.kind == "transcoder", "num_latents": n,
            "k": cfg.k, "multi_topk": False, "skip_connection": bool(cfg.skip), "transcode": cfg.kind == "transcoder",
            "d_in": d}


def export_sparsify(coder: SparseCoder, folder: str | os.PathLike[str], *, layer: int | None = None,
                    input_site: str | None = None, output_site: str | None = None,
                    model_name: str | None = None) -> Path:
    """Write ``coder`` as a sparsify folder (replaced whole, atomically); a :class:`ConfigError`
    before anything is written when sparsify cannot hold it."""
    check_sparsify_exportable(coder.cfg)
    tensors = sparsify_tensors(coder)
    entry = {"config": config_to_dict(coder.cfg), "layer": layer, "input_site": input_site,
             "output_site": output_site, "model_name": model_name or None}
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_tensors(tmp / SPARSIFY_WEIGHTS, tensors, metadata={META_KEY: json.dumps(json_safe(entry))})
        write_json(tmp / SPARSIFY_CFG, sparsify_cfg(coder.cfg))
    return folder
