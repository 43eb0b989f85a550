"""Inputs of the multi-hop toy: independent boolean inputs, sampled for training and enumerated
(every pattern with its probability) for exact measurements.

Each input ``a_j`` is 1 with probability ``density``, independently; there are ``n_inputs =
n_chains * (n_layers + 1)`` of them, so a measurement over all ``2^n_inputs`` patterns, each
weighted by ``density^ones (1 - density)^zeros``, is an exact expectation over the data.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from mechfaith.errors import ConfigError

MAX_ENUMERATED_INPUTS = 16


def sample_inputs(n: int, n_inputs: int, density: float, generator: torch.Generator | None = None) -> Tensor:
    """``n`` patterns [n, n_inputs] of independent Bernoulli(density) bits (float 0/1)."""
    if not 0.0 < density < 1.0:
        raise ConfigError(f"multihop: density must be in (0, 1), got {density}")
    return (torch.rand((n, n_inputs), generator=generator) < density).float()


def all_patterns(n_inputs: int, density: float) -> tuple[Tensor, Tensor]:
    """Every pattern [2^n_inputs, n_inputs] and its probability [2^n_inputs] (summing to 1)."""
    if n_inputs > MAX_ENUMERATED_INPUTS:
        raise ConfigError(f"multihop: {n_inputs} inputs are too many to enumerate (at most {MAX_ENUMERATED_INPUTS})")
    a = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n_inputs)))
    ones = a.sum(1)
    w = density ** ones * (1 - density) ** (n_inputs - ones)
    return a, w.double()
