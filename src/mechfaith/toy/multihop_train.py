"""Training the multi-hop toy's replacements: one :class:`~mechfaith.training.clt_trainer.CLTTrainer`
per (setting, seed), all members of one :class:`~mechfaith.training.engine.Engine` (one loop, one
progress bar, one host synchronisation per step).

Every member is a ReLU :class:`~mechfaith.coders.clt.CrossLayerTranscoder`; per-layer transcoders
are the reach-0 ones. Each member draws its own batch of boolean patterns every step (one
generator for the whole run) and is trained on the network's exact MLP inputs and outputs; the
real MLPs are the references of Jacobian matching.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.toy.multihop_data import sample_inputs
from mechfaith.toy.multihop_model import MultihopNet
from mechfaith.training.clt_trainer import CLTTrainer
from mechfaith.training.config import TrainConfig
from mechfaith.training.engine import Engine
from mechfaith.training.streams import FunctionStream

SPARSITIES = ("tanh_l1", "l1")


@dataclass(frozen=True)
class MultihopSpec:
    """One trained replacement: its setting, seed and what differs between settings."""

    setting: str
    seed: int
    reach: int | None  # 0: per-layer transcoders; None: a full CLT
    sparsity: str = "tanh_l1"
    sparsity_coef: float = 0.1
    jacobian_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.sparsity not in SPARSITIES:
            raise ConfigError(f"MultihopSpec.sparsity {self.sparsity!r} is not one of {', '.join(SPARSITIES)}")
        if self.sparsity_coef < 0 or self.jacobian_coef < 0:
            raise ConfigError("MultihopSpec: coefficients must be >= 0")


@dataclass
class TrainSettings:
    """The regime every member shares."""

    n_latents: int
    density: float
    steps: int
    batch: int
    lr: float
    tanh_c: float
    sparsity_warmup_frac: float
    data_seed: int


@dataclass
class TrainedMembers:
    """The trained replacements (same order as the specs) and how training went."""

    clts: list[CrossLayerTranscoder]
    specs: list[MultihopSpec]
    final: list[dict[str, float]]  # each member's last logged metrics
    seconds: float


def train_members(specs: Sequence[MultihopSpec], net: MultihopNet, ts: TrainSettings, *,
                  progress: bool = True, desc: str = "multihop") -> TrainedMembers:
    """Train one CLT per spec, all at once."""
    if not specs:
        raise ConfigError("train_members: no members")
    members, clts = [], []
    refs = list(net.mlps)
    for g, spec in enumerate(specs):
        cfg = CLTConfig(n_layers=net.n_layers, d_in=net.d_model, n_latents=ts.n_latents, reach=spec.reach,
                        activation="relu")
        clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(spec.seed))
        tcfg = TrainConfig(n_steps=ts.steps, batch_size=ts.batch, lr=ts.lr, lr_warmup_steps=min(100, ts.steps // 10),
                           lr_decay="cosine", lr_decay_frac=0.2, sparsity=spec.sparsity,
                           sparsity_coef=spec.sparsity_coef, tanh_scale=ts.tanh_c,
                           sparsity_warmup_steps=round(ts.sparsity_warmup_frac * ts.steps),
                           jacobian_coef=spec.jacobian_coef, log_every=max(1, ts.steps // 10),
                           checkpoint_every=0, seed=spec.seed)
        members.append(CLTTrainer(clt, tcfg, refs, progress=progress, desc=desc, name=f"m{g}"))
        clts.append(clt)
    n_in = net.layout.n_inputs

    def batch(gen: torch.Generator, n: int):
        xs, ys = [], []
        for _ in specs:
            x, y = net.run(sample_inputs(n, n_in, ts.density, gen))
            xs.append(x)
            ys.append(y)
        return xs, ys

    stream = FunctionStream(batch, batch_size=ts.batch, seed=ts.data_seed)
    start = time.perf_counter()
    results = Engine(members, progress=progress, desc=desc).fit(stream)
    for r in results:
        if not r.ok:
            raise TrainingDiverged(f"multihop: {r.message}")
    final = [{k: float(v) for k, v in r.final_metrics.items() if isinstance(v, (int, float))} for r in results]
    for clt in clts:
        clt.eval()
        clt.requires_grad_(False)
    return TrainedMembers(clts, list(specs), final, time.perf_counter() - start)
