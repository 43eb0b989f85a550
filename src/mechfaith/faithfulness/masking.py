"""Signs of gradient masking: features with large weights and very negative encoder biases that
rarely fire.

A feature can hide a large Jacobian from a Jacobian-matching loss that is only evaluated where it
is active by growing its weights while pushing its bias so far down that it almost never fires:
when it does fire, it writes a lot. Per feature i, on a sample of inputs ``x`` [N, d_in]:

- ``weight_product = ||W_enc[:, i]|| * ||W_dec[i]||`` (the feature's Jacobian contribution when
  active) and ``weight_ratio`` = that over the median over all features (scale-free);
- ``bias_z = b_enc[i] / std_n(x_n . W_enc[:, i])``: the bias in units of the spread of the
  feature's input projection (``-4``: the feature fires only on 4-sigma inputs);
- ``firing_rate``: share of rows with ``f_i > 0``.

Flagged: ``weight_ratio >= weight_ratio_threshold`` and ``bias_z <= bias_z_threshold`` and
``firing_rate <= max_firing_rate`` (never firing on the sample counts as rare). The absolute
criteria of the toy report (product > 2, bias < -0.5) are reported too as ``toy_criterion``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError, InputError


@dataclass
class MaskingConfig:
    """Thresholds of the gradient-masking detector."""

    weight_ratio_threshold: float = doc("Flag features whose ||W_enc,i|| ||W_dec,i|| is at least this "
                                        "many times the median over features ...", 3.0)
    bias_z_threshold: float = doc("... whose encoder bias is at most this many standard deviations "
                                  "of their input projection (negative) ...", -3.0)
    max_firing_rate: float = doc("... and which fire on at most this share of the sample.", 0.01)
    chunk_size: int = doc("Rows per chunk when encoding the sample.", 4096)

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.weight_ratio_threshold > 0 or not 0 <= self.max_firing_rate <= 1:
            raise ConfigError("MaskingConfig: weight_ratio_threshold must be > 0 and max_firing_rate in [0, 1]")
        if self.chunk_size < 1:
            raise ConfigError("MaskingConfig.chunk_size must be >= 1")


@dataclass
class MaskingFeature:
    index: int
    weight_product: float
    weight_ratio: float
    bias: float
    bias_z: float
    firing_rate: float


@torch.no_grad()
def feature_weight_stats(coder: SparseCoder, x: Tensor, chunk_size: int = 4096) -> dict[str, Tensor]:
    """Per feature [n_latents]: weight_product, weight_ratio, bias, bias_z, firing_rate."""
    if not isinstance(coder, SparseCoder):
        raise InputError(f"the masking detector needs a SparseCoder, got {type(coder).__name__}")
    x = coder.check_batch(x, "x").detach().to(coder.W_enc.dtype)
    if x.shape[0] < 2:
        raise InputError("the masking detector needs a sample of at least 2 rows")
    w_enc, w_dec, b = coder.W_enc.detach(), coder.W_dec.detach(), coder.b_enc.detach()
    prod = (w_enc.norm(dim=0) * w_dec.norm(dim=1)).double().cpu()
    med = float(prod.median())
    s1 = torch.zeros(coder.n_latents, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    fires = torch.zeros_like(s1)
    for i in range(0, x.shape[0], chunk_size):
        xc = x[i:i + chunk_size].to(w_enc.device)
        proj = (xc @ w_enc).double().cpu()  # [c, n]
        s1 += proj.sum(0)
        s2 += proj.pow(2).sum(0)
        fires += (coder.encode(xc) > 0).double().cpu().sum(0)
    n = x.shape[0]
    var = (s2 - s1.pow(2) / n) / (n - 1)
    std = var.clamp_min(0).sqrt()
    return {"weight_product": prod, "weight_ratio": prod / med if med > 0 else torch.full_like(prod, float("inf")),
            "bias": b.double().cpu(), "bias_z": b.double().cpu() / std.clamp_min(1e-30),
            "firing_rate": fires / n}


def detect_gradient_masking(coder: SparseCoder, x: Tensor, cfg: MaskingConfig | None = None) -> dict[str, Any]:
    """Flag masking-like features (module docstring); JSON-ready result with per-feature arrays."""
    cfg = cfg or MaskingConfig()
    st = feature_weight_stats(coder, x, cfg.chunk_size)
    flag = ((st["weight_ratio"] >= cfg.weight_ratio_threshold) & (st["bias_z"] <= cfg.bias_z_threshold)
            & (st["firing_rate"] <= cfg.max_firing_rate))
    toy = (st["weight_product"] > 2.0) & (st["bias"] < -0.5)
    flagged = [MaskingFeature(int(i), float(st["weight_product"][i]), float(st["weight_ratio"][i]),
                              float(st["bias"][i]), float(st["bias_z"][i]), float(st["firing_rate"][i]))
               for i in torch.nonzero(flag).flatten().tolist()]
    flagged.sort(key=lambda m: -m.weight_ratio)
    return {
        "n_flagged": len(flagged), "flagged": [asdict(m) for m in flagged],
        "n_toy_criterion": int(toy.sum()),
        "median_weight_product": float(st["weight_product"].median()),
        "max_weight_ratio": float(st["weight_ratio"].max()),
        "per_feature": {k: [float(v) for v in t] for k, t in st.items()},
        "config": asdict(cfg),
    }
