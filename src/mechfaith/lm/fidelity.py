"""Fidelity of spliced coders: how much of the model's behaviour survives the replacement.

For a causal LM, per batch of contexts: next-token cross-entropy of the clean model, with the coders
spliced in, with the same MLPs zero-ablated and mean-ablated; the KL divergence KL(clean || spliced)
per token; fraction of loss recovered ``(CE_abl - CE_spliced) / (CE_abl - CE_clean)`` against both
ablations. For an encoder without LM head (MiniLM), the relative error of the final hidden states
takes the place of the losses.

Per layer, from the clean run (coder applied to the clean input): FVE
``1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2``, MSE, L0 (mean active latents; BOS reported
separately), dead and dense latent fractions and a histogram of log10 feature densities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mechfaith.coders.coder import SparseCoder
from mechfaith.configs import doc
from mechfaith.errors import ConfigError
from mechfaith.lm.adapters import ModelAdapter, get_adapter, hooks_removed_after
from mechfaith.lm.splice import Coder, _check_output_site, ablate, splice


@dataclass
class FidelityConfig:
    """How fidelity is measured."""

    batch_contexts: int = doc("Contexts per forward pass.", 8)
    max_contexts: int = doc("Evaluate on at most this many contexts (0: all).", 0)
    exclude_bos: bool = doc("Leave the BOS position out of the coder statistics (FVE, L0, density); "
                            "its L0 is reported separately.", True)
    keep_bos: bool = doc("Keep the model's own MLP output at the BOS position when splicing.", False)
    dense_threshold: float = doc("A latent firing on more than this fraction of tokens is 'dense'.", 0.1)
    histogram_bins: int = doc("Bins of the log10 feature-density histogram (from 1e-7 to 1).", 28)

    def __post_init__(self) -> None:
        if self.batch_contexts <= 0 or self.max_contexts < 0 or self.histogram_bins <= 0:
            raise ConfigError("FidelityConfig: batch_contexts and histogram_bins must be positive, "
                              "max_contexts >= 0")
        if not 0 < self.dense_threshold <= 1:
            raise ConfigError("FidelityConfig.dense_threshold must be in (0, 1]")


@dataclass
class LayerStats:
    """Statistics of one layer's coder on clean inputs."""

    layer: int
    fve: float
    mse: float
    l0: float | None = None
    l0_bos: float | None = None
    dead_fraction: float | None = None
    dense_fraction: float | None = None
    density_histogram: dict[str, list[float]] | None = None  # {"edges": log10 edges, "counts": ...}


@dataclass
class FidelityReport:
    """What :func:`evaluate_fidelity` measured (CE in nats per predicted token)."""

    layers: list[int]
    n_tokens: int
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero_ablated: float | None = None
    ce_mean_ablated: float | None = None
    ce_increase: float | None = None
    loss_recovered_zero: float | None = None
    loss_recovered_mean: float | None = None
    kl_spliced: float | None = None
    kl_zero_ablated: float | None = None
    kl_mean_ablated: float | None = None
    hidden_rel_error_spliced: float | None = None  # encoders: ||h_spliced - h|| / ||h|| (final layer)
    hidden_rel_error_zero_ablated: float | None = None
    layer_stats: list[LayerStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Per-token next-token cross-entropy [batch, seq-1] (float32)."""
    lg = logits[:, :-1].float()
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").reshape(ids.shape[0], -1)


def kl_per_token(clean_logp: Tensor, other_logits: Tensor) -> Tensor:
    """KL(clean || other) per position [batch, seq] from clean log-probs and other logits."""
    other_logp = F.log_softmax(other_logits.float(), dim=-1)
    return (clean_logp.exp() * (clean_logp - other_logp)).sum(-1)


def loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """``(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)`` (nan if the ablation costs nothing)."""
    denom = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / denom if abs(denom) > 1e-12 else float("nan")


def mean_mlp_outputs(model: Any, contexts: Tensor, layers: list[int], batch_contexts: int = 8,
                     exclude_bos: bool = True) -> dict[int, Tensor]:
    """Mean MLP output [d_model] of each layer over the contexts' tokens (for mean ablation)."""
    adapter = get_adapter(model)
    sums: dict[int, Tensor] = {}
    count = 0
    start = 1 if exclude_bos else 0
    with torch.inference_mode():
        for i in range(0, contexts.shape[0], batch_contexts):
            ids = contexts[i:i + batch_contexts].to(_device(adapter))
            cache = adapter.run_with_cache(ids, [(l, "mlp_out") for l in layers])
            for l in layers:
                s = cache[(l, "mlp_out")][:, start:].double().sum(dim=(0, 1))
                sums[l] = sums[l] + s if l in sums else s
            count += ids.shape[0] * (ids.shape[1] - start)
    return {l: (s / count).float() for l, s in sums.items()}


def _device(adapter: ModelAdapter) -> torch.device:
    return next(adapter.model.parameters()).device


class _StatsAccumulator:
    """Sums for FVE, L0 and latent densities of one layer's coder on clean inputs."""

    def __init__(self, coder: Coder, start: int) -> None:
        self.coder = coder
        self.start = start
        self.sse = 0.0
        self.n = 0
        self.y_sum: Tensor | None = None
        self.y_sq = 0.0
        self.fire: Tensor | None = None
        self.l0_sum = 0.0
        self.l0_bos_sum = 0.0
        self.n_bos = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        # x [batch, seq, d_in], y [batch, seq, d_out]
        body_x = x[:, self.start:].reshape(-1, x.shape[-1])
        body_y = y[:, self.start:].reshape(-1, y.shape[-1]).double()
        if isinstance(self.coder, SparseCoder):
            out = self.coder.forward_full(body_x.to(self.coder.W_enc.dtype))
            y_hat = out.y_hat.double()
            active = out.f != 0
            self.fire = active.sum(0).double() + (self.fire if self.fire is not None else 0)
            self.l0_sum += float(active.sum())
            if self.start == 1:
                f_bos = self.coder.forward_full(x[:, 0].to(self.coder.W_enc.dtype)).f
                self.l0_bos_sum += float((f_bos != 0).sum())
                self.n_bos += x.shape[0]
        else:
            y_hat = self.coder(body_x).double()
        self.sse += float((body_y - y_hat).pow(2).sum())
        self.y_sum = body_y.sum(0) + (self.y_sum if self.y_sum is not None else 0)
        self.y_sq += float(body_y.pow(2).sum())
        self.n += body_y.shape[0]

    def result(self, layer: int, cfg: FidelityConfig) -> LayerStats:
        assert self.y_sum is not None
        total_var = self.y_sq - float(self.y_sum.pow(2).sum()) / self.n
        stats = LayerStats(layer=layer, fve=1.0 - self.sse / total_var if total_var > 0 else float("nan"),
                           mse=self.sse / self.n)
        if self.fire is not None:
            density = self.fire / self.n
            stats.l0 = self.l0_sum / self.n
            stats.l0_bos = self.l0_bos_sum / self.n_bos if self.n_bos else None
            stats.dead_fraction = float((density == 0).double().mean())
            stats.dense_fraction = float((density > cfg.dense_threshold).double().mean())
            alive = density[density > 0]
            edges = torch.linspace(-7.0, 0.0, cfg.histogram_bins + 1, dtype=torch.float64)
            counts = torch.histc(alive.log10().clamp(-7.0, 0.0), bins=cfg.histogram_bins, min=-7.0, max=0.0)
            stats.density_histogram = {"edges": edges.tolist(), "counts": counts.tolist(),
                                       "dead": int((density == 0).sum())}
        return stats


def evaluate_fidelity(model: Any, contexts: Tensor, coders: Mapping[int, Coder], input_site: str = "mlp_in",
                      output_site: str = "mlp_out", cfg: FidelityConfig | None = None,
                      means: Mapping[int, Tensor] | None = None, progress: bool = False) -> FidelityReport:
    """Measure the fidelity of splicing ``coders`` ({layer: coder}) into ``model`` on ``contexts``
    (int64 [n, seq], starting with BOS). All layers are spliced / ablated together."""
    cfg = cfg or FidelityConfig()
    adapter = get_adapter(model)
    _check_output_site(adapter, output_site)
    layers = sorted(adapter.check_layer(int(l)) for l in coders)
    if contexts.ndim != 2 or contexts.shape[0] == 0:
        raise ConfigError("contexts must be a non-empty int64 tensor [n_contexts, context_length]")
    if cfg.max_contexts:
        contexts = contexts[: cfg.max_contexts]
    lm = adapter.has_lm_head and adapter.family.causal
    device = _device(adapter)
    if lm and means is None:
        means = mean_mlp_outputs(adapter, contexts, layers, cfg.batch_contexts, exclude_bos=True)
    start = 1 if cfg.exclude_bos else 0
    acc = {l: _StatsAccumulator(coders[l], start) for l in layers}
    sums: dict[str, float] = {}
    n_pred = 0

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value.double().sum())

    bar = tqdm(total=contexts.shape[0], unit="ctx", desc="fidelity", disable=not progress, leave=False)
    with torch.inference_mode():
        for i in range(0, contexts.shape[0], cfg.batch_contexts):
            ids = contexts[i:i + cfg.batch_contexts].to(device)
            captured: dict[tuple[int, str], Tensor] = {}
            with hooks_removed_after() as handles:
                for l in layers:
                    for site in (input_site, output_site):
                        handles.extend(adapter.hook_site(l, site, lambda t, k=(l, site): captured.__setitem__(k, t)))
                if lm:
                    clean_logits = adapter.logits(ids)
                else:
                    handles.extend(adapter.hook_site(adapter.n_layers - 1, "resid_post",
                                                     lambda t: captured.__setitem__((-1, "final"), t)))
                    adapter.forward(ids)
            for l in layers:
                acc[l].add(captured[(l, input_site)], captured[(l, output_site)])
            if lm:
                clean_logp = F.log_softmax(clean_logits.float(), dim=-1)
                add("ce_clean", next_token_ce(clean_logits, ids))
                del clean_logits
                variants = {"spliced": splice(adapter, {l: coders[l] for l in layers}, input_site,
                                              output_site, keep_bos=cfg.keep_bos),
                            "zero_ablated": ablate(adapter, layers, "zero"),
                            "mean_ablated": ablate(adapter, layers, "mean", means)}
                for name, ctx in variants.items():
                    with ctx:
                        logits = adapter.logits(ids)
                    add(f"ce_{name}", next_token_ce(logits, ids))
                    add(f"kl_{name}", kl_per_token(clean_logp[:, :-1], logits[:, :-1]))
                    del logits
                n_pred += ids.shape[0] * (ids.shape[1] - 1)
            else:
                final = captured[(-1, "final")].double()
                norm = float(final.pow(2).sum())
                add("hidden_norm", torch.tensor(norm))
                for name, ctx in (("spliced", splice(adapter, {l: coders[l] for l in layers}, input_site,
                                                     output_site, keep_bos=cfg.keep_bos)),
                                  ("zero_ablated", ablate(adapter, layers, "zero"))):
                    got: dict[str, Tensor] = {}
                    with ctx, hooks_removed_after() as hs:
                        hs.extend(adapter.hook_site(adapter.n_layers - 1, "resid_post",
                                                    lambda t: got.__setitem__("h", t)))
                        adapter.forward(ids)
                    add(f"hidden_err_{name}", (got["h"].double() - final).pow(2))
            bar.update(ids.shape[0])
    bar.close()
    n_tokens = int(contexts.shape[0] * contexts.shape[1])
    report = FidelityReport(layers=layers, n_tokens=n_tokens,
                            layer_stats=[acc[l].result(l, cfg) for l in layers])
    if lm:
        ce = {k: sums[f"ce_{k}"] / n_pred for k in ("clean", "spliced", "zero_ablated", "mean_ablated")}
        report.ce_clean, report.ce_spliced = ce["clean"], ce["spliced"]
        report.ce_zero_ablated, report.ce_mean_ablated = ce["zero_ablated"], ce["mean_ablated"]
        report.ce_increase = ce["spliced"] - ce["clean"]
        report.loss_recovered_zero = loss_recovered(ce["clean"], ce["spliced"], ce["zero_ablated"])
        report.loss_recovered_mean = loss_recovered(ce["clean"], ce["spliced"], ce["mean_ablated"])
        report.kl_spliced = sums["kl_spliced"] / n_pred
        report.kl_zero_ablated = sums["kl_zero_ablated"] / n_pred
        report.kl_mean_ablated = sums["kl_mean_ablated"] / n_pred
    else:
        hn = sums["hidden_norm"]
        report.hidden_rel_error_spliced = math.sqrt(sums["hidden_err_spliced"] / hn)
        report.hidden_rel_error_zero_ablated = math.sqrt(sums["hidden_err_zero_ablated"] / hn)
    return report
