"""Training the toy's grid of coders at once: one :class:`~mechfaith.training.stack.CoderStack`
trained by the engine's :class:`~mechfaith.training.stack_trainer.StackTrainer`.

The toy's regime, as a :class:`~mechfaith.training.config.TrainConfig`: Adam (the plain kernel, so
runs reproduce the numbers published before the engine existed), linear lr warm-up over ``warmup``
steps and a cosine decay to 0 over the last ``decay_frac``; the sparsity coefficients ramp from 0
over the first ``sparsity_warmup_frac`` of the steps; latents that fired on fewer than ``dead_rate``
of the inputs since the last check are resampled every ``resample_every`` steps during the first
``resample_until_frac``. Data, Jacobian probes and resampling draw from one generator, in that order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from mechfaith.coders import CoderConfig
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.toy.data import sample_with_repeats
from mechfaith.toy.members import MemberSpec, member_settings
from mechfaith.toy.model import AbsMLP
from mechfaith.training.config import TrainConfig
from mechfaith.training.stack import CoderStack
from mechfaith.training.stack_trainer import Resampling, StackTrainer
from mechfaith.training.streams import FunctionStream

log = logging.getLogger(__name__)


@dataclass
class GridResult:
    """A trained grid and how its training went."""

    coder: CoderStack
    specs: list[MemberSpec]
    final_losses: dict[str, list[float]]  # per-member loss terms averaged over the last steps
    seconds: float
    n_resampled: list[int]  # dead latents re-initialised, per member


def train_grid(specs: Sequence[MemberSpec], mlp: AbsMLP, p: torch.Tensor, *, n_latents: int,
               density: float, steps: int, batch: int, lr: float, tanh_c: float = 4.0,
               n_probes: int = 1, warmup: int = 100, decay_frac: float = 0.2,
               sparsity_warmup_frac: float = 0.2, resample_every: int = 250,
               resample_until_frac: float = 0.6, dead_rate: float = 1e-3, data_seed: int = 0,
               progress: bool = True, desc: str = "toy grid") -> GridResult:
    """Train one coder per spec (all together) on ``abs`` data with the specs' repeat fractions."""
    if not specs:
        raise ConfigError("train_grid: no members")
    if steps <= 0 or batch <= 0 or lr <= 0 or n_probes <= 0:
        raise ConfigError("train_grid: steps, batch, lr and n_probes must be positive")
    d = mlp.d
    # unit-norm initial rows: the regime in ToyConfig (lr, steps, resampling) was tuned with them
    cfg = CoderConfig(d_in=d, n_latents=n_latents, activation="relu", decoder_norm="penalty", init_scale=1.0)
    stack = CoderStack.initialised([cfg] * len(specs), [s.seed for s in specs])
    tcfg = TrainConfig(n_steps=steps, batch_size=batch, lr=lr, lr_warmup_steps=warmup, lr_decay="cosine",
                       lr_decay_frac=decay_frac, lr_final_frac=0.0, sparsity="tanh_l1", tanh_scale=tanh_c,
                       sparsity_warmup_steps=round(sparsity_warmup_frac * steps), n_probes=n_probes,
                       auxk_coef=0.0, log_every=max(1, steps // 15), checkpoint_every=0)
    repeat_frac = torch.tensor([s.repeat_frac for s in specs], dtype=torch.float64)
    stream = FunctionStream(lambda g, n: sample_with_repeats(len(specs), n, d, density, repeat_frac, p, g),
                            batch_size=batch, seed=data_seed)
    trainer = StackTrainer(stack, tcfg, settings=member_settings(specs, tanh_c), reference=mlp,
                           resampling=Resampling(resample_every, resample_until_frac, dead_rate),
                           generator=stream.generator, fused_adam=False, average_last=max(1, steps // 20),
                           progress=progress, desc=desc, name="toy")
    start = time.perf_counter()
    result = trainer.fit(stream)
    if not result.ok:
        raise TrainingDiverged(f"toy grid: {result.message}")
    seconds = time.perf_counter() - start
    log.info("toy grid: %d members, %d steps in %.1f s; %d dead latents resampled", len(specs), steps,
             seconds, int(trainer.n_resampled.sum()))
    return GridResult(stack, list(specs), trainer.tail_means, seconds, trainer.n_resampled.tolist())
