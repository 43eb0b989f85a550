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
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mechfaith.configs import doc
from mechfaith.errors import ConfigError
from mechfaith.lm.adapters import ModelAdapter, get_adapter, hooks_removed_after
from mechfaith.lm.coder_stats import LayerStats, StatsAccumulator
from mechfaith.lm.splice import Coder, ablate, check_output_site, splice


@dataclass
class FidelityConfig:
    """How fidelity is measured."""

    batch_contexts: int = doc("Contexts per forward pass.", 8)
    max_contexts: int = doc("Evaluate on at most this many contexts (0: all).", 0)
    exclude_bos: bool = doc("Leave the BOS position out of the coder statistics (FVE, L0, density); "
                            "its L0 is reported separately.", True)
    keep_bos: bool = doc("Keep the model's own MLP output at the BOS position when splicing.", False)
    keep_massive: float = doc("Also keep it at positions whose MLP output norm exceeds this multiple of the "
                              "batch's median (attention sinks; 0: never).", 0.0)
    dense_threshold: float = doc("A latent firing on more than this fraction of tokens is 'dense'.", 0.1)
    histogram_bins: int = doc("Bins of the log10 feature-density histogram (from 1e-7 to 1).", 28)

    def __post_init__(self) -> None:
        if self.batch_contexts <= 0 or self.max_contexts < 0 or self.histogram_bins <= 0:
            raise ConfigError("FidelityConfig: batch_contexts and histogram_bins must be positive, "
                              "max_contexts >= 0")
        if not self.keep_massive >= 0:
            raise ConfigError("FidelityConfig.keep_massive must be >= 0")
        if not 0 < self.dense_threshold <= 1:
            raise ConfigError("FidelityConfig.dense_threshold must be in (0, 1]")


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FidelityReport":
        """The inverse of :meth:`to_dict` (e.g. the ``report`` of an ``eval.json``)."""
        stats = [LayerStats(**s) for s in data.get("layer_stats", [])]
        return cls(**{**data, "layer_stats": stats})


@dataclass
class SpliceEntry:
    """One coder to splice: its layer and sites (input_site 'mlp_out' for an SAE of the output)."""

    coder: Any
    layer: int
    input_site: str
    output_site: str = "mlp_out"


@dataclass
class SpliceBaseline:
    """The runs shared by every spliced coder (CE in nats per predicted token). The ablations are
    keyed by their group of layers ("3", or "1,2" for layers ablated together); a causal LM has
    the CE / KL fields, an encoder the hidden-state error."""

    n_tokens: int
    layers: list[int]
    ce_clean: float | None = None
    ce_zero_ablated: dict[str, float] | None = None
    ce_mean_ablated: dict[str, float] | None = None
    kl_zero_ablated: dict[str, float] | None = None
    kl_mean_ablated: dict[str, float] | None = None
    hidden_rel_error_zero_ablated: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields that apply (None ones left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class SpliceFidelity:
    """One named splice (one coder, or several spliced together): per-layer statistics and the
    model's behaviour with it spliced in (CE / KL fields for a causal LM, hidden error otherwise)."""

    layer_stats: list[LayerStats]
    ce_spliced: float | None = None
    ce_increase: float | None = None
    kl_spliced: float | None = None
    loss_recovered_zero: float | None = None
    loss_recovered_mean: float | None = None
    hidden_rel_error_spliced: float | None = None


@dataclass
class ManyFidelity:
    """What :func:`evaluate_many` measured."""

    baseline: SpliceBaseline
    coders: dict[str, SpliceFidelity]


def group_key(layers: Sequence[int]) -> str:
    """The key of a group of layers ablated together in :class:`SpliceBaseline`: "3", "1,2"."""
    return ",".join(str(l) for l in layers)


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
            ids = contexts[i:i + batch_contexts].to(model_device(adapter))
            cache = adapter.run_with_cache(ids, [(l, "mlp_out") for l in layers])
            for l in layers:
                s = cache[(l, "mlp_out")][:, start:].double().sum(dim=(0, 1))
                sums[l] = sums[l] + s if l in sums else s
            count += ids.shape[0] * (ids.shape[1] - start)
    return {l: (s / count).float() for l, s in sums.items()}


def model_device(adapter: ModelAdapter) -> torch.device:
    return next(adapter.model.parameters()).device


def _as_list(value: SpliceEntry | Sequence[SpliceEntry]) -> list[SpliceEntry]:
    return [value] if isinstance(value, SpliceEntry) else list(value)


def _variants(adapter: ModelAdapter, named: Mapping[str, list[SpliceEntry]], ablations: list[tuple[int, ...]],
              means: Mapping[int, Tensor] | None, keep_bos: bool, keep_massive: float = 0.0) -> list[tuple[str, Any]]:
    """(key, context-manager factory) of every run besides the clean one: each group of layers
    zero-ablated (and mean-ablated when ``means`` is given), each named splice."""
    out: list[tuple[str, Any]] = []
    for group in ablations:
        out.append((f"zero_ablated/{group_key(group)}", lambda g=group: ablate(adapter, list(g), "zero")))
        if means is not None:
            out.append((f"mean_ablated/{group_key(group)}", lambda g=group: ablate(adapter, list(g), "mean", means)))
    for name, es in named.items():
        out.append((f"spliced/{name}", lambda es=es: splice(
            adapter, {e.layer: e.coder for e in es}, es[0].input_site, es[0].output_site, keep_bos=keep_bos,
            keep_massive=keep_massive)))
    return out


def evaluate_many(model: Any, contexts: Tensor, entries: Mapping[str, SpliceEntry | Sequence[SpliceEntry]],
                  cfg: FidelityConfig | None = None, means: Mapping[int, Tensor] | None = None,
                  progress: bool = False, desc: str = "fidelity",
                  ablations: Sequence[Sequence[int]] | None = None) -> ManyFidelity:
    """Fidelity of each named splice, sharing the clean and ablated runs between them.

    ``entries``: {name: one :class:`SpliceEntry`, or several (distinct layers) spliced together}.
    Per batch: one clean run that captures every coder's sites, one run per group of layers
    zero- and mean-ablated together, one run per name spliced. ``ablations``: the groups of
    layers to ablate (default: the layers of each name); a name's loss recovered is reported
    when its group is among them.
    """
    cfg = cfg or FidelityConfig()
    adapter = get_adapter(model)
    named = _checked_entries(adapter, entries, contexts)
    if cfg.max_contexts:
        contexts = contexts[: cfg.max_contexts]
    groups = {name: tuple(sorted(e.layer for e in es)) for name, es in named.items()}
    groups_ablated = sorted({tuple(sorted(int(l) for l in g)) for g in ablations} if ablations is not None
                            else set(groups.values()))
    layers = sorted({e.layer for es in named.values() for e in es})
    lm = adapter.has_lm_head and adapter.family.causal
    device = model_device(adapter)
    if lm and means is None:
        means = mean_mlp_outputs(adapter, contexts, layers, cfg.batch_contexts, exclude_bos=True)
    start = 1 if cfg.exclude_bos else 0
    shared: dict[tuple[int, int, str, str], StatsAccumulator] = {}  # one per coder and sites, whatever the names
    acc = {name: [shared.setdefault((id(e.coder), e.layer, e.input_site, e.output_site), StatsAccumulator(e.coder, start))
                  for e in es] for name, es in named.items()}
    sites = {(e.layer, s) for es in named.values() for e in es for s in (e.input_site, e.output_site)}
    sums: dict[str, float] = {}
    n_pred = 0

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value.double().sum())

    variants = _variants(adapter, named, groups_ablated, means if lm else None, cfg.keep_bos, cfg.keep_massive)
    bar = tqdm(total=contexts.shape[0], unit="ctx", desc=desc, disable=not progress, leave=False)
    with torch.inference_mode():
        for i in range(0, contexts.shape[0], cfg.batch_contexts):
            ids = contexts[i:i + cfg.batch_contexts].to(device)
            captured: dict[Any, Tensor] = {}
            with hooks_removed_after() as handles:
                for site in sites:
                    handles.extend(adapter.hook_site(site[0], site[1], _store_into(captured, site)))
                if not lm:
                    handles.extend(adapter.hook_site(adapter.n_layers - 1, "resid_post",
                                                     lambda t: captured.__setitem__("final", t)))
                    adapter.forward(ids)
                else:
                    clean_logits = adapter.logits(ids)
            for (_, layer, in_site, out_site), a in shared.items():
                a.add(captured[(layer, in_site)], captured[(layer, out_site)])
            if lm:
                clean_logp = F.log_softmax(clean_logits.float(), dim=-1)[:, :-1]
                add("ce_clean", next_token_ce(clean_logits, ids))
                del clean_logits
                for key, make in variants:
                    with make():
                        logits = adapter.logits(ids)
                    add(f"ce/{key}", next_token_ce(logits, ids))
                    add(f"kl/{key}", kl_per_token(clean_logp, logits[:, :-1]))
                    del logits
                n_pred += ids.shape[0] * (ids.shape[1] - 1)
            else:
                final = captured["final"].double()
                add("hidden_norm", final.pow(2))
                for key, make in variants:
                    got: dict[str, Tensor] = {}
                    with make(), hooks_removed_after() as hs:
                        hs.extend(adapter.hook_site(adapter.n_layers - 1, "resid_post",
                                                    lambda t: got.__setitem__("h", t)))
                        adapter.forward(ids)
                    add(f"err/{key}", (got["h"].double() - final).pow(2))
            bar.update(ids.shape[0])
    bar.close()
    return _many_result(named, groups, groups_ablated, acc, sums, n_pred, int(contexts.numel()), layers, lm, cfg)


def _checked_entries(adapter: ModelAdapter, entries: Mapping[str, SpliceEntry | Sequence[SpliceEntry]],
                     contexts: Tensor) -> dict[str, list[SpliceEntry]]:
    """The named splices as lists, after checking them and the contexts (one-line errors)."""
    named = {name: _as_list(v) for name, v in entries.items()}
    if not named or any(not es for es in named.values()):
        raise ConfigError("evaluate_many needs at least one coder")
    if contexts.ndim != 2 or contexts.shape[0] == 0:
        raise ConfigError("contexts must be a non-empty int64 tensor [n_contexts, context_length]")
    for e in (e for es in named.values() for e in es):
        check_output_site(adapter, e.output_site)
        adapter.check_layer(int(e.layer))
    return named


def _store_into(store: dict[Any, Tensor], key: Any) -> Callable[[Tensor], None]:
    """A hook that stores its activation as ``store[key]``."""
    return lambda t: store.__setitem__(key, t)


def _many_result(named: Mapping[str, list[SpliceEntry]], groups: Mapping[str, tuple[int, ...]],
                 ablations: list[tuple[int, ...]], acc: Mapping[str, list[StatsAccumulator]],
                 sums: Mapping[str, float], n_pred: int, n_tokens: int, layers: list[int], lm: bool,
                 cfg: FidelityConfig) -> ManyFidelity:
    """The sums of :func:`evaluate_many` turned into its result."""
    base = SpliceBaseline(n_tokens=n_tokens, layers=layers)
    coders = {name: SpliceFidelity([a.result(e.layer, cfg.dense_threshold, cfg.histogram_bins) for a, e in zip(acc[name], es)])
              for name, es in named.items()}
    if lm:
        ce_clean = sums["ce_clean"] / n_pred
        base.ce_clean = ce_clean
        per = {f"{m}_{abl}": {group_key(g): sums[f"{m}/{abl}/{group_key(g)}"] / n_pred for g in ablations}
               for m in ("ce", "kl") for abl in ("zero_ablated", "mean_ablated")}
        base.ce_zero_ablated, base.ce_mean_ablated = per["ce_zero_ablated"], per["ce_mean_ablated"]
        base.kl_zero_ablated, base.kl_mean_ablated = per["kl_zero_ablated"], per["kl_mean_ablated"]
        for name, c in coders.items():
            key = group_key(groups[name])
            c.ce_spliced = sums[f"ce/spliced/{name}"] / n_pred
            c.ce_increase = c.ce_spliced - ce_clean
            c.kl_spliced = sums[f"kl/spliced/{name}"] / n_pred
            if key in base.ce_zero_ablated:
                c.loss_recovered_zero = loss_recovered(ce_clean, c.ce_spliced, base.ce_zero_ablated[key])
                c.loss_recovered_mean = loss_recovered(ce_clean, c.ce_spliced, base.ce_mean_ablated[key])
    else:
        hn = sums["hidden_norm"]
        base.hidden_rel_error_zero_ablated = {
            group_key(g): math.sqrt(sums[f"err/zero_ablated/{group_key(g)}"] / hn) for g in ablations}
        for name, c in coders.items():
            c.hidden_rel_error_spliced = math.sqrt(sums[f"err/spliced/{name}"] / hn)
    return ManyFidelity(baseline=base, coders=coders)


def evaluate_fidelity(model: Any, contexts: Tensor, coders: Mapping[int, Coder], input_site: str = "mlp_in",
                      output_site: str = "mlp_out", cfg: FidelityConfig | None = None,
                      means: Mapping[int, Tensor] | None = None, progress: bool = False) -> FidelityReport:
    """Measure the fidelity of splicing ``coders`` ({layer: coder}) into ``model`` on ``contexts``
    (int64 [n, seq], starting with BOS). All layers are spliced / ablated together: the case of
    :func:`evaluate_many` with one entry."""
    adapter = get_adapter(model)
    layers = sorted(adapter.check_layer(int(l)) for l in coders)
    entries = [SpliceEntry(coders[l], l, input_site, output_site) for l in layers]
    many = evaluate_many(adapter, contexts, {"coders": entries}, cfg, means=means, progress=progress)
    base, got, key = many.baseline, many.coders["coders"], group_key(layers)
    report = FidelityReport(layers=layers, n_tokens=base.n_tokens, layer_stats=got.layer_stats)
    if base.ce_clean is not None:
        assert base.ce_zero_ablated is not None and base.ce_mean_ablated is not None
        assert base.kl_zero_ablated is not None and base.kl_mean_ablated is not None
        report.ce_clean, report.ce_spliced = base.ce_clean, got.ce_spliced
        report.ce_zero_ablated, report.ce_mean_ablated = base.ce_zero_ablated[key], base.ce_mean_ablated[key]
        report.ce_increase = got.ce_increase
        report.loss_recovered_zero, report.loss_recovered_mean = got.loss_recovered_zero, got.loss_recovered_mean
        report.kl_spliced = got.kl_spliced
        report.kl_zero_ablated, report.kl_mean_ablated = base.kl_zero_ablated[key], base.kl_mean_ablated[key]
    else:
        assert base.hidden_rel_error_zero_ablated is not None
        report.hidden_rel_error_spliced = got.hidden_rel_error_spliced
        report.hidden_rel_error_zero_ablated = base.hidden_rel_error_zero_ablated[key]
    return report
