"""Sparse coders: architectures, sparsity penalties and their files."""

from mechfaith.coders.coder import CoderOutput, SparseCoder
from mechfaith.coders.config import ACTIVATIONS, CoderConfig
from mechfaith.coders.penalties import PENALTIES, jacobian_contribution_penalty, sparsity_penalty

__all__ = ["ACTIVATIONS", "CoderConfig", "CoderOutput", "PENALTIES", "SparseCoder",
           "jacobian_contribution_penalty", "sparsity_penalty", "build_coder"]


def build_coder(cfg: CoderConfig, *, seed: int | None = None) -> SparseCoder:
    """A freshly initialised coder (deterministic when ``seed`` is given)."""
    import torch

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SparseCoder(cfg, generator=gen)
