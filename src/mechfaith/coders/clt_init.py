"""Data-driven initialisation of a cross-layer transcoder, layer by layer as
:func:`mechfaith.coders.init.init_from_data` does for one coder.

For each block layer t: ``W_skip[t]`` and ``b_dec[t]`` the ridge least-squares fit of y[t] from x[t]
(with a skip; otherwise ``b_dec[t]`` = the mean of y[t]); ``b_enc[t] = -mean(x[t]) W_enc[t]``
(centred encoder). Then every encoder is scaled by ONE factor so that the latents' total
contribution starts at ``latent_init_fraction`` of the RMS of what skip and bias leave (ReLU and
TopK latents are positively homogeneous, and the contributions of all layers add up, so a common
factor keeps their balance; JumpReLU CLTs are left unscaled).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.init import FIT_ROWS, SAMPLE_ROWS, DataInit, init_skip_lstsq
from mechfaith.errors import ConfigError


@torch.no_grad()
def init_clt_from_data(clt: CrossLayerTranscoder, x: Tensor, y: Tensor, *, skip_init: str = "lstsq",
                       latent_init_fraction: float = 0.3, center_encoder: bool = True,
                       ridge: float = 1e-4) -> list[DataInit]:
    """Initialise ``clt`` from rows x [L, N, d_in] and targets y [L, N, d_out] (module docstring);
    returns each layer's :class:`DataInit` (the skip's FVE, the common encoder scale)."""
    L = clt.n_layers
    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != L or y.shape[0] != L or x.shape[1] != y.shape[1] or x.shape[1] == 0:
        raise ConfigError(f"init_clt_from_data needs x [{L}, N, d_in] and y [{L}, N, d_out] with N > 0")
    if latent_init_fraction < 0:
        raise ConfigError(f"latent_init_fraction must be >= 0, got {latent_init_fraction}")
    fves: list[float | None] = []
    for t in range(L):
        if clt.W_skip is not None and skip_init == "lstsq":
            tmp = SparseCoder(CoderConfig(d_in=clt.d_in, n_latents=1, d_out=clt.d_out, skip=True), dtype=torch.float64)
            fves.append(init_skip_lstsq(tmp, x[t, :FIT_ROWS], y[t, :FIT_ROWS], ridge))
            assert tmp.W_skip is not None
            clt.W_skip[t].copy_(tmp.W_skip.to(clt.W_skip.dtype))
            clt.b_dec[t].copy_(tmp.b_dec.to(clt.b_dec.dtype))
        else:
            fves.append(None)
            clt.b_dec[t].copy_(y[t, :FIT_ROWS].mean(0).to(clt.b_dec.dtype))
        if center_encoder:
            clt.b_enc[t].copy_(-(x[t, :SAMPLE_ROWS].to(clt.W_enc.dtype).mean(0) @ clt.W_enc[t]))
    scale: float | None = None
    if latent_init_fraction > 0 and clt.cfg.activation != "jumprelu":
        xs = x[:, :SAMPLE_ROWS].to(clt.W_enc.dtype)
        ys = y[:, :SAMPLE_ROWS].to(clt.W_enc.dtype)
        out = clt.forward_full(xs)
        base = clt.b_dec.unsqueeze(1).expand_as(out.y_hat)
        if clt.W_skip is not None:
            base = torch.baddbmm(base, xs, clt.W_skip)
        part, rest = out.y_hat - base, ys - base
        rms_part, rms_rest = float(part.pow(2).mean().sqrt()), float(rest.pow(2).mean().sqrt())
        if rms_part > 0 and rms_rest > 0:
            scale = latent_init_fraction * rms_rest / rms_part
            clt.W_enc.mul_(scale)
            clt.b_enc.mul_(scale)
    return [DataInit(skip_fve=f, encoder_scale=scale) for f in fves]
