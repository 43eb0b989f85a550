"""The arms of the memorization experiment: which kind of transcoder a cell trains, and how.

An arm is named ``KIND`` or ``KIND-skip``:

- ``topk``: TopK latents (k from the experiment's ``ks``), no sparsity penalty;
- ``relu-tanh``: ReLU latents with the toy model's tanh-L1 penalty
  ``lambda * sum_i tanh(c f_i ||W_dec,i||)`` (``tanh_coef``, ``tanh_c``);
- ``jumprelu``: JumpReLU latents (learned thresholds, straight-through) with the L0 penalty
  (``jumprelu_coef``);

and ``-skip`` adds a linear skip connection initialised by least squares (without it the coder's
only linear part is its decoder bias). Penalty arms have no k: their sparsity is set by their
coefficient, chosen so that their L0 is comparable to the TopK arms' (see the experiment's config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.errors import ConfigError

KINDS = ("topk", "relu-tanh", "jumprelu")
SKIP_SUFFIX = "-skip"


@dataclass(frozen=True)
class Arm:
    """One arm: the coder kind and whether it has a linear skip."""

    kind: str
    skip: bool

    @property
    def name(self) -> str:
        return self.kind + (SKIP_SUFFIX if self.skip else "")

    @property
    def uses_k(self) -> bool:
        """Whether the arm's sparsity is a TopK k (else a penalty coefficient)."""
        return self.kind == "topk"


def parse_arm(spec: str) -> Arm:
    """The :class:`Arm` named ``spec`` (``KIND`` or ``KIND-skip``); :class:`ConfigError` otherwise."""
    skip = spec.endswith(SKIP_SUFFIX)
    kind = spec[: -len(SKIP_SUFFIX)] if skip else spec
    if kind not in KINDS:
        names = ", ".join(f"{k}, {k}{SKIP_SUFFIX}" for k in KINDS)
        raise ConfigError(f"unknown arm {spec!r}: arms are {names}")
    return Arm(kind, skip)


def arm_coder_config(arm: Arm, d_in: int, d_out: int, n_latents: int, k: int, *,
                     jumprelu_threshold: float = 1e-3, jumprelu_bandwidth: float = 1e-3) -> CoderConfig:
    """The coder of ``arm`` (unit-norm initial rows, as the LM defaults were tuned with)."""
    activation = {"topk": "topk", "relu-tanh": "relu", "jumprelu": "jumprelu"}[arm.kind]
    return CoderConfig(d_in=d_in, n_latents=n_latents, d_out=d_out, activation=activation,
                       k=k if arm.uses_k else 1, skip=arm.skip, init_scale=1.0,
                       jumprelu_threshold=jumprelu_threshold, jumprelu_bandwidth=jumprelu_bandwidth)


@torch.no_grad()
def init_thresholds(coder: SparseCoder, x: Tensor, target_l0: float) -> float:
    """Set a JumpReLU coder's thresholds so that each latent fires on a share ``target_l0 /
    n_latents`` of the rows ``x`` (its pre-activation's quantile there, at least 1e-3): the coder
    starts at the L0 of a TopK coder with k = ``target_l0`` (the thresholds then move slowly, so
    this sets the arm's sparsity as much as the L0 penalty does). Returns the L0 reached on ``x``."""
    if coder.log_threshold is None:
        raise ValueError("init_thresholds needs a JumpReLU coder")
    pre = x.to(coder.W_enc.dtype) @ coder.W_enc + coder.b_enc
    q = 1.0 - min(max(target_l0 / coder.cfg.n_latents, 0.0), 1.0)
    theta = torch.quantile(pre, q, dim=0).clamp_min(1e-3)
    coder.log_threshold.copy_(theta.log())
    return float((pre > theta).sum(1).double().mean())


def arm_penalty(arm: Arm, tanh_coef: float, tanh_c: float, jumprelu_coef: float,
                jumprelu_threshold_lr: float = 1.0) -> dict[str, Any]:
    """The training options of ``arm``'s sparsity penalty (``TrainConfig`` fields; for JumpReLU
    also the thresholds' learning-rate multiple, which sets its L0 in short runs)."""
    if arm.kind == "relu-tanh":
        return {"sparsity": "tanh_l1", "sparsity_coef": tanh_coef, "tanh_scale": tanh_c}
    if arm.kind == "jumprelu":
        return {"sparsity": "l0", "sparsity_coef": jumprelu_coef, "threshold_lr_scale": jumprelu_threshold_lr}
    return {"sparsity": "none", "sparsity_coef": 0.0}


__all__ = ["Arm", "KINDS", "SKIP_SUFFIX", "arm_coder_config", "arm_penalty", "init_thresholds", "parse_arm"]
