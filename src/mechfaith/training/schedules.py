"""Learning-rate and sparsity-coefficient schedules: pure functions of the step index.

``step`` is the 0-based index of the optimiser step about to be taken (0 .. n_steps - 1).

Learning rate = ``lr * warmup(step) * decay(step)``:

- warm-up: ``min(1, (step + 1) / lr_warmup_steps)`` (so the first step uses ``lr / warmup``);
- decay over the last ``D = round(lr_decay_frac * n_steps)`` steps, starting at ``s0 = n_steps - D``,
  with progress ``t = (step - s0) / D`` in [0, 1): ``linear``: ``1 - t (1 - final)``;
  ``cosine``: ``final + (1 - final) (1 + cos(pi t)) / 2``; 1 before ``s0``. ``t`` would reach 1 (the
  value ``lr * lr_final_frac``) at step ``n_steps``, one past the last step taken.

Sparsity coefficient = ``sparsity_coef * min(1, (step + 1) / sparsity_warmup_steps)``.
"""

from __future__ import annotations

import math

from mechfaith.training.config import TrainConfig


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up factor in (0, 1]."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def decay_factor(step: int, n_steps: int, kind: str, frac: float, final: float) -> float:
    """Decay factor in [final, 1] (see the module docs)."""
    if kind == "none":
        return 1.0
    n_decay = int(round(frac * n_steps))
    if n_decay <= 0:
        return 1.0
    start = n_steps - n_decay
    if step < start:
        return 1.0
    t = min(1.0, (step - start) / n_decay)
    if kind == "linear":
        return 1.0 - t * (1.0 - final)
    if kind == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr decay {kind!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of step ``step`` (``lr * (step + 1) / warmup`` in the warm-up)."""
    lr = cfg.lr * (step + 1) / cfg.lr_warmup_steps if step < cfg.lr_warmup_steps else cfg.lr
    decay = decay_factor(step, cfg.n_steps, cfg.lr_decay, cfg.lr_decay_frac, cfg.lr_final_frac)
    return lr if decay == 1.0 else lr * decay


def sparsity_coef_at(step: int, cfg: TrainConfig) -> float:
    """The sparsity coefficient of step ``step``."""
    return cfg.sparsity_coef * warmup_factor(step, cfg.sparsity_warmup_steps)
