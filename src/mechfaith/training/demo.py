"""The built-in synthetic task of ``mechfaith train``: learn a fixed random GELU MLP.

Inputs x are sparse Gaussian vectors in R^d_in (each coordinate non-zero with probability
``density``); the target is y = MLP(x) for a fixed random MLP d_in -> 4 d_in -> d_out with GELU,
which is also the reference for Jacobian matching. The trainer computes the target from the
reference, so the stream yields inputs only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechfaith.errors import ConfigError
from mechfaith.training.streams import FunctionStream

TASK_NAME = "demo-gelu-mlp"


def demo_reference(d_in: int, d_out: int, seed: int = 1234) -> nn.Module:
    """The fixed random GELU MLP the demo transcoder learns (frozen: no parameter requires grad)."""
    gen = torch.Generator().manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(d_in, 4 * d_in), nn.GELU(), nn.Linear(4 * d_in, d_out))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.5)
    for p in mlp.parameters():
        p.requires_grad_(False)
    return mlp


def demo_inputs(gen: torch.Generator, n: int, d_in: int, density: float) -> Tensor:
    """``n`` sparse Gaussian inputs: N(0, 1) coordinates, each kept with probability ``density``."""
    x = torch.randn(n, d_in, generator=gen)
    return x * (torch.rand(n, d_in, generator=gen) < density)


def demo_stream(d_in: int, density: float, batch_size: int, seed: int) -> FunctionStream:
    """The deterministic (resumable) stream of demo batches ``(x, None)``: the target comes from the reference."""
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density}")

    def batch(gen: torch.Generator, n: int) -> tuple[Tensor, Tensor | None]:
        return demo_inputs(gen, n, d_in, density), None

    return FunctionStream(batch, batch_size=batch_size, seed=seed)


__all__ = ["TASK_NAME", "demo_inputs", "demo_reference", "demo_stream"]
