"""Training metrics as pure functions of tensors (each returns a 0-dim tensor; no host sync).

- ``mse``: mean over every element of ``(y_hat - y)^2``;
- ``fve``: fraction of variance explained, ``1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2``
  (sums over rows and dimensions, mean over the rows of the batch);
- ``l0``: mean number of active latents per row;
- ``dead_fraction``: fraction of latents that have not fired for ``window`` tokens or more.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mse(y_hat: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per element."""
    return (y_hat - y).square().mean()


def sse(y_hat: Tensor, y: Tensor) -> Tensor:
    """Sum of squared errors over everything."""
    return (y_hat - y).square().sum()


def total_variance(y: Tensor) -> Tensor:
    """``sum ||y - mean_rows(y)||^2`` for y [batch, d]."""
    return (y - y.mean(dim=0, keepdim=True)).square().sum()


def fve(y_hat: Tensor, y: Tensor, *, err_sq_sum: Tensor | None = None) -> Tensor:
    """Fraction of variance explained (1 is perfect, 0 is as good as predicting the mean).

    ``err_sq_sum`` may pass ``sum ||y - y_hat||^2`` when it is already known.
    """
    err = sse(y_hat, y) if err_sq_sum is None else err_sq_sum
    return 1.0 - err / total_variance(y).clamp_min(torch.finfo(y.dtype).tiny)


def l0(active: Tensor) -> Tensor:
    """Mean number of nonzero entries per row of ``active`` [batch, n_latents] (values or a mask)."""
    if active.dtype == torch.bool:
        return active.sum(dtype=torch.float32) / active.shape[0]
    return (active != 0).sum(dtype=torch.float32) / active.shape[0]


def dead_fraction(tokens_since_fired: Tensor, window: int) -> Tensor:
    """Fraction of latents with ``tokens_since_fired >= window``."""
    return (tokens_since_fired >= window).float().mean()
