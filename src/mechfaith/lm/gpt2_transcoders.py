"""The released GPT-2 transcoders (Dunefsky et al., ``pchlenski/gpt2-transcoders``) as coders.

:func:`import_gpt2_transcoder` reads the files
``final_sparse_autoencoder_gpt2-small_blocks.{L}.ln2.hook_normalized_24576.pt``, a ``torch.save``
zip of ``{"cfg": LanguageModelSAERunnerConfig, "state_dict": {W_enc [768, 24576], b_enc, W_dec
[24576, 768], b_dec [768], b_dec_out [768]}}`` computing ``relu((x - b_dec) W_enc + b_enc) W_dec +
b_dec_out``. They are read with the restricted unpickler of :mod:`mechfaith.lm.safe_unpickle`
(never ``torch.load``), and every tensor is checked (:func:`~mechfaith.coders.validate.check_tensor`:
rank, shape, floating point, finite). Convention mapping: the transcoders were trained on
TransformerLens-processed GPT-2 (LayerNorm folded into the next weights, writing weights centred),
so on a Hugging Face GPT-2 their input is ``mlp_in_normalized`` (ln_2's input normalised, before
its affine) and their output is ``mlp_out_centered`` (the MLP output minus its mean over d_model),
which may replace ``mlp_out`` directly because every reader of the residual stream is a LayerNorm.
``b_dec`` is folded into the encoder bias: ``b_enc' = b_enc - b_dec W_enc``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.validate import check_tensor
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.lm.saelens import ImportedCoder
from mechfaith.lm.safe_unpickle import safe_torch_load

_LEGACY_NAME = re.compile(r"blocks\.(\d+)\.ln2\.hook_normalized")


def import_gpt2_transcoder(path: str | os.PathLike[str]) -> ImportedCoder:
    """Read a released GPT-2 transcoder ``.pt`` (see the module docstring for the convention)."""
    path = Path(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CoderFileError(path, "expected a dict with 'cfg' and 'state_dict'")
    sd, cfg = obj["state_dict"], obj.get("cfg")
    cfg = cfg if isinstance(cfg, dict) else {}
    if not isinstance(sd, dict):
        raise CoderFileError(path, "'state_dict' is not a mapping")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"):
        if not isinstance(sd.get(name), Tensor):
            raise CoderFileError(path, f"state_dict has no tensor {name!r}")
        check_tensor(path, name, sd[name], rank=2 if name.startswith("W_") else 1)  # float, finite
    d_in, n = sd["W_enc"].shape
    d_out = sd["W_dec"].shape[1]
    for name, shape in (("W_dec", (n, d_out)), ("b_enc", (n,)), ("b_dec", (d_in,)), ("b_dec_out", (d_out,))):
        check_tensor(path, name, sd[name], shape=shape)
    W_enc, b_enc, W_dec = sd["W_enc"].double(), sd["b_enc"].double(), sd["W_dec"].double()
    b_dec, b_dec_out = sd["b_dec"].double(), sd["b_dec_out"].double()
    try:
        cfg_coder = CoderConfig(d_in=d_in, n_latents=n, d_out=d_out, kind="transcoder", activation="relu")
    except ConfigError as exc:
        raise CoderFileError(path, f"the tensors do not make a coder ({exc})") from None
    coder = SparseCoder(cfg_coder)
    b_enc_folded = b_enc - b_dec @ W_enc
    if not bool(torch.isfinite(b_enc_folded.float()).all()):
        raise CoderFileError(path, "b_enc - b_dec W_enc overflows float32")
    with torch.no_grad():
        coder.W_enc.copy_(W_enc.float())
        coder.b_enc.copy_(b_enc_folded.float())
        coder.W_dec.copy_(W_dec.float())
        coder.b_dec.copy_(b_dec_out.float())
    layer = None
    hook = cfg.get("hook_point")
    m = _LEGACY_NAME.search(hook if isinstance(hook, str) else "") or _LEGACY_NAME.search(path.name)
    if m:
        layer = int(m.group(1))
    source = {k: v for k, v in cfg.items() if not isinstance(v, Tensor)}
    return ImportedCoder(coder.eval(), layer, "mlp_in_normalized", "mlp_out_centered", source)
