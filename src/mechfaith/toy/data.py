"""Data of the toy task: sparse uniform inputs, with a repeated datapoint ``p`` mixed in.

- ``x_i = Uniform(-1, 1)`` with probability ``density``, else exactly 0; coordinates independent.
- ``p = [1, 1, 1, 0, ..., 0]`` (ones on the first ``n_ones`` dims) replaces a sample with
  probability ``repeat_frac``.

Batches for a grid of G coders are drawn at once, ``[G, batch, d]``, each member with its own
``repeat_frac`` (a tensor [G]); members never share samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechfaith.errors import ConfigError


def datapoint(d: int, n_ones: int = 3, dtype: torch.dtype = torch.float32) -> Tensor:
    """The repeated datapoint ``p`` [d]: ones on the first ``n_ones`` dims, zeros elsewhere."""
    if not 1 <= n_ones <= d:
        raise ConfigError(f"datapoint: n_ones must be in 1..{d}, got {n_ones}")
    p = torch.zeros(d, dtype=dtype)
    p[:n_ones] = 1.0
    return p


def sample_sparse(shape: tuple[int, ...], density: float, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Sparse inputs of ``shape`` [..., d]: Uniform(-1, 1) where Uniform(0, 1) < density, else 0."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    values = torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1
    keep = torch.rand(shape, generator=generator, dtype=dtype) < density
    return values * keep


def sample_with_repeats(n_members: int, batch: int, d: int, density: float, repeat_frac: Tensor,
                        p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A batch [n_members, batch, d]; in member g each row is ``p`` with probability ``repeat_frac[g]``."""
    x = sample_sparse((n_members, batch, d), density, generator, p.dtype)
    rf = repeat_frac.to(p.dtype).reshape(n_members, 1, 1)
    is_p = torch.rand((n_members, batch, 1), generator=generator, dtype=p.dtype) < rf
    return torch.where(is_p, p.expand_as(x), x)
