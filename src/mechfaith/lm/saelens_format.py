"""What mechfaith knows of SAELens's folder format: file names, architectures, hook names, and the
:class:`ImportedCoder` every importer returns.

SAELens 6 writes a folder with ``cfg.json`` and ``sae_weights.safetensors``. ``cfg.json`` holds
``architecture``, ``d_in``, ``d_sae`` (``d_out`` for transcoders; ``k`` and
``rescale_acts_by_decoder_norm`` for TopK), ``dtype``, ``device``, ``apply_b_dec_to_input``,
``normalize_activations``, ``reshape_activations`` and ``metadata`` (``sae_lens_version``,
``sae_lens_training_version``, ``model_name``, ``hook_name``, ``hook_name_out``, ...). A config with
no ``sae_lens_version`` (top level or in ``metadata``), or one below 6, is a flat pre-6.0 config
that SAELens reads with old defaults (``apply_b_dec_to_input`` true, ``hook_point`` for
``hook_name``, ``activation_fn_str`` / ``activation_fn_kwargs`` for TopK); :func:`is_saelens_6`
tells them apart.

Architectures: :data:`READ_ARCHITECTURES` are read (:mod:`mechfaith.lm.saelens_read`),
:data:`WRITE_ARCHITECTURES` written (:mod:`mechfaith.lm.saelens_write`); :data:`REFUSED` gives the
reason for each SAELens architecture that is not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mechfaith.coders.coder import SparseCoder

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# written as ``sae_lens_version``: the first SAELens format with nested metadata (SAELens reads any
# config below 6.0 as a flat pre-6.0 one and drops its hook and model names)
SAELENS_FORMAT_VERSION = "6.0.0"

SAE_ARCHITECTURES = ("standard", "topk", "jumprelu")
TRAINING_ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")  # SAELens training checkpoints
TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
READ_ARCHITECTURES = SAE_ARCHITECTURES + TRAINING_ARCHITECTURES + TRANSCODER_ARCHITECTURES
WRITE_ARCHITECTURES = SAE_ARCHITECTURES + TRANSCODER_ARCHITECTURES
TOPK_FAMILY = ("topk",) + TRAINING_ARCHITECTURES  # the ones with rescale_acts_by_decoder_norm
JUMPRELU_FAMILY = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")
SKIP_ARCHITECTURES = ("skip_transcoder", "jumprelu_skip_transcoder")
REFUSED = {
    "gated": "separate gate and magnitude encoders (a mechfaith coder has one encoder)",
    "abstopk": "TopK by absolute value with negative latents (no such mechfaith activation)",
    "temporal": "attention over earlier tokens' latents (not a per-token coder)",
    "matching_pursuit": "an iterative matching-pursuit encoder (not a one-layer encoder)",
}

SITE_TO_HOOK = {"resid_pre": "hook_resid_pre", "mlp_in": "ln2.hook_normalized",
                "mlp_in_normalized": "ln2.hook_normalized", "mlp_out": "hook_mlp_out",
                "mlp_out_centered": "hook_mlp_out", "resid_post": "hook_resid_post"}
HOOK_TO_SITE = {"hook_resid_pre": "resid_pre", "ln2.hook_normalized": "mlp_in_normalized",
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
    model_name: str | None = None


def parse_hook(name: str | None) -> tuple[int | None, str | None]:
    """(layer, site) from a TransformerLens hook name like ``blocks.8.ln2.hook_normalized``."""
    if not name:
        return None, None
    m = re.match(r"blocks\.(\d+)\.(.+)$", name)
    if not m:
        return None, None
    return int(m.group(1)), HOOK_TO_SITE.get(m.group(2))


def hook_name(layer: int | None, site: str) -> str | None:
    """The TransformerLens hook name of ``site`` at ``layer`` (None when the layer is unknown)."""
    if layer is None:
        return None
    return f"blocks.{layer}.{SITE_TO_HOOK.get(site, site)}"


def is_saelens_6(raw: dict[str, Any]) -> bool:
    """Whether SAELens reads ``raw`` as a 6.x config (a ``sae_lens_version`` of 6 or more, at the
    top level or in ``metadata``); otherwise it is a flat pre-6.0 config."""
    version = raw.get("sae_lens_version")
    meta = raw.get("metadata")
    if not version and isinstance(meta, dict):
        version = meta.get("sae_lens_version")
    if not isinstance(version, str) or not version:
        return False
    m = re.match(r"\s*v?(\d+)", version)
    return bool(m) and int(m.group(1)) >= 6  # type: ignore[union-attr]
