"""The multi-hop faithfulness toy (after Lange et al., 2025): do cross-layer transcoders replace a
multi-step circuit by a shortcut that reads the raw inputs, and does the sparsity penalty push them to?

Ground truth: :mod:`mechfaith.toy.multihop_model` (chained ANDs, one hop per layer). Replacements,
all ReLU, tanh-L1 on ``f ||W_dec||`` (decoder norm summed over target layers), several seeds each:

- ``per_layer``: per-layer transcoders (a reach-0 CLT) at ``sparsity_coef``;
- ``clt_lam<λ>``: full CLTs without Jacobian matching, one setting per λ in ``sparsity_coefs``;
- ``clt_jacobian``: a full CLT at ``sparsity_coef`` with local-Jacobian matching.

Measured by :func:`mechfaith.toy.multihop_metrics.measure_clt`, exactly over every input pattern;
summarised and checked against the claims in :mod:`mechfaith.toy.multihop_claims`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.configs import check_finite, config_to_dict, doc
from mechfaith.errors import ConfigError
from mechfaith.toy.multihop_claims import DEFINITIONS, claims, summarise
from mechfaith.toy.multihop_data import MAX_ENUMERATED_INPUTS, all_patterns
from mechfaith.toy.multihop_metrics import CLTMeasures, measure_clt
from mechfaith.toy.multihop_model import MultihopNet
from mechfaith.toy.multihop_train import MultihopSpec, TrainSettings, train_members

PER_LAYER, JACOBIAN = "per_layer", "clt_jacobian"


def clt_setting(lam: float) -> str:
    """The name of the CLT setting without Jacobian matching at sparsity ``lam``."""
    return f"clt_lam{lam:g}"


@dataclass
class MultihopConfig:
    """The multi-hop faithfulness toy: ground truth, replacements, training, seeds."""

    n_chains: int = doc("Independent AND chains in the ground truth (each adds n_layers + 1 inputs).", 2)
    n_layers: int = doc("Residual layers of the ground truth (hops per chain; 2 to 4).", 2)
    d_model: Optional[int] = doc("Residual width (None: one dimension per feature).", None)
    embed_seed: int = doc("Seed of the random orthonormal feature directions (-1: the standard basis).", 0)
    density: float = doc("Probability that each boolean input is 1 (independently).", 0.4)
    n_latents: int = doc("Latents per layer of every replacement.", 8)
    sparsity_coefs: list[float] = doc("tanh-L1 coefficients λ of the CLTs without Jacobian matching "
                                      "(one setting each).", default_factory=lambda: [0.0, 0.01, 0.03])
    sparsity_coef: float = doc("tanh-L1 coefficient λ of the per-layer transcoders and of the "
                               "Jacobian-matched CLT.", 0.03)
    jacobian_coef: float = doc("Coefficient of local-Jacobian matching of the clt_jacobian setting.", 1.0)
    tanh_c: float = doc("Scale c of tanh-L1: λ sum tanh(c f ||W_dec||).", 4.0)
    steps: int = doc("Training steps (every replacement trains at once).", 1500)
    batch: int = doc("Input patterns per step per replacement.", 256)
    lr: float = doc("Adam learning rate (cosine decay over the last 20%).", 3e-3)
    sparsity_warmup_frac: float = doc("Fraction of the steps over which λ ramps up from 0.", 0.2)
    seeds: int = doc("Seeds per setting (initialisation and Jacobian probes).", 3)
    seed: int = doc("Base seed (seeds are seed, seed + 1, ...; the data stream derives from it).", 0)
    threads: int = doc("torch CPU threads during the run (restored after).", 1)

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("n_chains", "n_latents", "steps", "batch", "seeds", "threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"MultihopConfig.{name} must be positive, got {getattr(self, name)}")
        if not 2 <= self.n_layers <= 4:
            raise ConfigError(f"MultihopConfig.n_layers must be in 2..4, got {self.n_layers}")
        n_inputs = self.n_chains * (self.n_layers + 1)
        if n_inputs > MAX_ENUMERATED_INPUTS:
            raise ConfigError(f"MultihopConfig: {n_inputs} inputs (n_chains x (n_layers + 1)) exceed "
                              f"{MAX_ENUMERATED_INPUTS}, too many to measure over every pattern")
        n_features = n_inputs + self.n_chains * self.n_layers
        if self.d_model is not None and self.d_model < n_features:
            raise ConfigError(f"MultihopConfig.d_model = {self.d_model} is below the {n_features} features")
        if not 0 < self.density < 1:
            raise ConfigError(f"MultihopConfig.density must be in (0, 1), got {self.density}")
        if not self.sparsity_coefs or any(c < 0 for c in self.sparsity_coefs):
            raise ConfigError("MultihopConfig.sparsity_coefs must be a non-empty list of values >= 0")
        if len(set(self.sparsity_coefs)) != len(self.sparsity_coefs):
            raise ConfigError("MultihopConfig.sparsity_coefs must not repeat a value")
        for name in ("sparsity_coef", "jacobian_coef", "tanh_c"):
            if getattr(self, name) < 0:
                raise ConfigError(f"MultihopConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.sparsity_warmup_frac < 1:
            raise ConfigError("MultihopConfig: lr must be > 0 and sparsity_warmup_frac in [0, 1)")


QUICK: dict[str, Any] = dict(steps=300, seeds=2, sparsity_coefs=[0.0, 0.03])


def quick_config(**overrides: Any) -> MultihopConfig:
    """The ``--quick`` run (a smoke test: same outputs, numbers not meaningful), with overrides."""
    return MultihopConfig(**{**QUICK, **overrides})


def specs_of(cfg: MultihopConfig) -> list[MultihopSpec]:
    """Every replacement of the run, seeds innermost within each setting."""
    out = []
    for s in range(cfg.seeds):
        seed = cfg.seed + s
        out.append(MultihopSpec(PER_LAYER, seed, 0, "tanh_l1", cfg.sparsity_coef))
        out += [MultihopSpec(clt_setting(lam), seed, None, "tanh_l1", lam) for lam in cfg.sparsity_coefs]
        out.append(MultihopSpec(JACOBIAN, seed, None, "tanh_l1", cfg.sparsity_coef, cfg.jacobian_coef))
    return out


def build_net(cfg: MultihopConfig) -> MultihopNet:
    return MultihopNet(cfg.n_chains, cfg.n_layers, cfg.d_model, None if cfg.embed_seed < 0 else cfg.embed_seed)


@dataclass
class MultihopRun:
    """Everything the report needs."""

    config: MultihopConfig
    metrics: dict[str, Any]
    net: MultihopNet
    examples: dict[str, CrossLayerTranscoder] = field(default_factory=dict)  # setting -> first seed's
    measures: dict[str, CLTMeasures] = field(default_factory=dict)  # setting -> first seed's


def run_multihop(cfg: MultihopConfig, *, progress: bool = True) -> MultihopRun:
    """Train every replacement of ``cfg``, measure each, summarise and check the claims."""
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: MultihopConfig, progress: bool) -> MultihopRun:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    net = build_net(cfg)
    specs = specs_of(cfg)
    ts = TrainSettings(cfg.n_latents, cfg.density, cfg.steps, cfg.batch, cfg.lr, cfg.tanh_c,
                       cfg.sparsity_warmup_frac, cfg.seed + 10_000)
    trained = train_members(specs, net, ts, progress=progress, desc=f"multihop: {len(specs)} replacements")
    a, w = all_patterns(net.layout.n_inputs, cfg.density)
    measures = [measure_clt(clt, net, a, w) for clt in trained.clts]
    settings = summarise(specs, measures, trained.final)
    examples: dict[str, CrossLayerTranscoder] = {}
    firsts: dict[str, CLTMeasures] = {}
    for spec, clt, m in zip(specs, trained.clts, measures):
        if spec.setting not in examples:
            examples[spec.setting], firsts[spec.setting] = clt, m
    metrics = {
        "config": config_to_dict(cfg),
        "ground_truth": {"features": net.layout.names(), "n_inputs": net.layout.n_inputs,
                         "d_model": net.d_model, "n_patterns": int(a.shape[0])},
        "definitions": DEFINITIONS,
        "settings": settings,
        "claims": claims(settings, cfg),
        "timing": {"train_seconds": trained.seconds, "total_seconds": time.perf_counter() - t0,
                   "n_replacements": len(specs)},
        "torch_version": torch.__version__,
    }
    return MultihopRun(cfg, metrics, net, examples, firsts)
