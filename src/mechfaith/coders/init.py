"""Data-driven initialisation of a coder from a sample of its (input, target) rows.

:func:`init_from_data` is the one used by LM training (:mod:`mechfaith.lm.train`) and the
memorization study (:mod:`mechfaith.studies.memorization`); it composes:

- :func:`init_skip_lstsq`: ``W_skip`` and ``b_dec`` set to the ridge least-squares fit of the
  target from the input (transcoders with a skip; otherwise ``b_dec`` is the target's mean);
- :func:`center_encoder_`: ``b_enc = -mean(x) W_enc`` (the encoder sees centred inputs);
- :func:`scale_encoder_`: the encoder scaled so the latents start with a given fraction of what the
  skip and bias leave unexplained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.errors import ConfigError, InputError

SKIP_INITS = ("lstsq", "zero")
FIT_ROWS = 65536  # rows for the least-squares skip / the bias
SAMPLE_ROWS = 8192  # rows for the encoder's centring and scaling


@dataclass
class DataInit:
    """What :func:`init_from_data` did."""

    skip_fve: float | None  # variance explained by the least-squares skip (None: no lstsq skip)
    encoder_scale: float | None  # factor applied to the encoder (None: not rescaled)


@torch.no_grad()
def init_skip_lstsq(coder: SparseCoder, x: Tensor, y: Tensor, ridge: float = 1e-4) -> float:
    """Set ``W_skip`` and ``b_dec`` to the ridge least-squares fit of ``y`` from ``x`` (float64);
    returns the fraction of variance that linear map explains on these rows."""
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)  # (constant rows: a zero Gram matrix)
    gram += ridge * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    try:
        w = torch.linalg.solve(gram, xc.T @ yc)  # [d_in, d_out]
    except torch.linalg.LinAlgError:
        raise InputError("the least-squares skip cannot be fitted to these rows (they are degenerate); "
                         "use skip_init zero") from None
    b = my - mx @ w
    if coder.W_skip is None:
        raise ConfigError("init_skip_lstsq needs a coder with a skip connection (cfg.skip)")
    coder.W_skip.copy_(w.to(coder.W_skip.dtype))
    coder.b_dec.copy_(b.to(coder.b_dec.dtype))
    resid = yc - xc @ w
    return float(1.0 - resid.pow(2).sum() / yc.pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def scale_encoder_(coder: SparseCoder, x: Tensor, y: Tensor, fraction: float = 0.1) -> float:
    """Scale ``W_enc`` and ``b_enc`` so that the latents' initial contribution ``f W_dec`` has
    ``fraction`` of the RMS of what is left to explain (``y`` minus the skip and bias part); ReLU
    and TopK latents are positively homogeneous, so this starts training near the linear fit
    instead of far from it. Returns the scale applied (1 for JumpReLU, which is left alone)."""
    if coder.cfg.activation == "jumprelu":
        return 1.0
    xin = x.to(coder.W_enc.dtype)
    out = coder.forward_full(xin)
    part = out.f @ coder.W_dec  # [rows, d_out]
    rest = y.to(part.dtype) - (out.y_hat - part)
    rms_part = float(part.pow(2).mean().sqrt())
    rms_rest = float(rest.pow(2).mean().sqrt())
    if rms_part <= 0 or rms_rest <= 0:
        return 1.0
    scale = fraction * rms_rest / rms_part
    coder.W_enc.mul_(scale)
    coder.b_enc.mul_(scale)  # pre = x W_enc + b_enc scales as a whole
    return scale


@torch.no_grad()
def center_encoder_(coder: SparseCoder, x: Tensor) -> None:
    """``b_enc = -mean(x) W_enc``: pre-activations of the centred input, so that the input's large
    mean (shared by every token) does not make the same latents win TopK on every token."""
    coder.b_enc.copy_(-(x.to(coder.W_enc.dtype).mean(0) @ coder.W_enc))


@torch.no_grad()
def init_from_data(coder: SparseCoder, x: Tensor, y: Tensor, *, skip_init: str = "lstsq",
                   latent_init_fraction: float = 0.3, center_encoder: bool = True,
                   ridge: float = 1e-4) -> DataInit:
    """Initialise ``coder`` from rows ``x`` [N, d_in] and their targets ``y`` [N, d_out] (for an
    SAE, ``y`` is ``x``), in this order: the skip and ``b_dec`` from the first :data:`FIT_ROWS`
    rows (least squares when the coder has a skip and ``skip_init`` is 'lstsq', else ``b_dec`` =
    mean target), then, on the first :data:`SAMPLE_ROWS` rows, the encoder centred (when
    ``center_encoder``) and scaled to ``latent_init_fraction`` (when > 0). Pass rows in the order
    they should be used (shuffle first for a random sample)."""
    if skip_init not in SKIP_INITS:
        raise ConfigError(f"skip_init must be one of {', '.join(SKIP_INITS)}, not {skip_init!r}")
    if latent_init_fraction < 0:
        raise ConfigError(f"latent_init_fraction must be >= 0, got {latent_init_fraction}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"init_from_data needs the same non-zero number of x and y rows, got "
                          f"{x.shape[0]} and {y.shape[0]}")
    device = coder.W_enc.device  # rows collected on a GPU may initialise a coder still on the CPU
    x, y = x.to(device), y.to(device)
    skip_fve = None
    if coder.cfg.skip and skip_init == "lstsq":
        skip_fve = init_skip_lstsq(coder, x[:FIT_ROWS], y[:FIT_ROWS], ridge)
    else:
        coder.b_dec.copy_(y[:FIT_ROWS].mean(0))
    sample_x, sample_y = x[:SAMPLE_ROWS], y[:SAMPLE_ROWS]
    if center_encoder:
        center_encoder_(coder, sample_x)
    scale = None
    if latent_init_fraction > 0:
        scale = scale_encoder_(coder, sample_x, sample_y, latent_init_fraction)
    return DataInit(skip_fve=skip_fve, encoder_scale=scale)


__all__ = ["DataInit", "FIT_ROWS", "SAMPLE_ROWS", "SKIP_INITS", "center_encoder_", "init_from_data",
           "init_skip_lstsq", "scale_encoder_"]
