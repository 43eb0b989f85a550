"""Pareto sweep: SAEs and transcoders at one layer over several sparsity settings, L0 vs spliced CE.

One activation cache feeds every coder, and every coder trains in one engine from one stream
(:class:`~mechfaith.training.engine.Engine`: each keeps its own Adam, schedules and dead-latent
state and ends exactly as it would trained alone). Transcoders map the MLP input to its output; SAEs
reconstruct the MLP output and replace it with their reconstruction (the comparison of the
transcoder paper's layer-8 figure). All coders are then evaluated in one pass over held-out
contexts that shares the clean, zero-ablated and mean-ablated runs
(:func:`mechfaith.lm.fidelity.evaluate_many`). The figure of each coder's L0 against its spliced
CE is drawn from the result by :func:`mechfaith.reports.sweep_plot.plot_sweep`.

Outputs in the sweep folder: ``activations/`` (unless given), ``runs/<kind>_<param><value>/`` (one
train run each) and ``sweep.json`` (:class:`SweepResult`; ``sweep.png`` is drawn by the caller).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mechfaith.atomic import final_path
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.collect import collect
from mechfaith.lm.config import LMCoderConfig, LMConfig, check_run_configs
from mechfaith.lm.corpus import CorpusConfig, eval_contexts
from mechfaith.lm.fidelity import FidelityConfig, SpliceBaseline, SpliceEntry, SpliceFidelity, evaluate_many
from mechfaith.lm.model_cache import get_model, resolve_layer
from mechfaith.lm.train import ACTIVATIONS_DIR, CoderRun, finish_coder_run, prepare_coder_run
from mechfaith.training.config import TrainConfig
from mechfaith.training.engine import Engine

log = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
SWEEP_KINDS = ("transcoder", "sae")
LM_ONLY = ("ce_spliced", "ce_increase", "kl_spliced", "loss_recovered_zero", "loss_recovered_mean")


@dataclass
class SweepRun:
    """One coder of the sweep: how it was trained and how it did spliced in (CE fields for a causal
    LM, ``hidden_rel_error_spliced`` for an encoder; the other ones are None and left out of the JSON)."""

    name: str
    kind: str
    param: str
    value: float
    train_seconds: float
    final_train_metrics: dict[str, float]
    layer: int
    input_site: str
    output_site: str
    fve: float | None
    mse: float | None
    l0: float | None
    l0_bos: float | None
    dead_fraction: float | None
    dense_fraction: float | None
    ce_spliced: float | None = None
    ce_increase: float | None = None
    kl_spliced: float | None = None
    loss_recovered_zero: float | None = None
    loss_recovered_mean: float | None = None
    hidden_rel_error_spliced: float | None = None

    @classmethod
    def of(cls, run: dict[str, Any], entry: SpliceEntry, got: SpliceFidelity) -> SweepRun:
        st = got.layer_stats[0]
        spliced = {k: getattr(got, k) for k in (*LM_ONLY, "hidden_rel_error_spliced")}
        return cls(**run, layer=entry.layer, input_site=entry.input_site, output_site=entry.output_site,
                   fve=st.fve, mse=st.mse, l0=st.l0, l0_bos=st.l0_bos, dead_fraction=st.dead_fraction,
                   dense_fraction=st.dense_fraction, **spliced)

    @property
    def spliced(self) -> float | None:
        """The figure's y value: spliced CE (causal LM) or the hidden-state error (encoder)."""
        return self.ce_spliced if self.ce_spliced is not None else self.hidden_rel_error_spliced

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for k in (*LM_ONLY, "hidden_rel_error_spliced"):
            if data[k] is None:
                del data[k]
        return data


@dataclass
class SweepResult:
    """What :func:`run_sweep` trained and measured (``sweep.json``)."""

    model: str
    family: str
    layer: int
    param: str
    values: list[float]
    kinds: list[str]
    eval_source: str
    eval_contexts: int
    baseline: SpliceBaseline
    runs: list[SweepRun]
    eval_seconds: float
    total_seconds: float
    figure: str

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(baseline=self.baseline.to_json(), runs=[r.to_json() for r in self.runs])
        return json_safe({"command": "sweep", **data})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"baseline", "runs"}
        return cls(**{k: data[k] for k in names}, baseline=SpliceBaseline(**data["baseline"]),
                   runs=[SweepRun(**r) for r in data["runs"]])


# ---------------------------------------------------------------------- the sweep
def sweep_param(activation: str) -> str:
    """The sparsity knob of an activation: ``k`` for topk / batchtopk, ``sparsity_coef`` otherwise."""
    return "k" if activation in ("topk", "batchtopk") else "sparsity_coef"


def value_label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def run_sweep(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
              values: Sequence[float], out: str | Path, *, kinds: Sequence[str] = SWEEP_KINDS,
              activations: str | Path | None = None, progress: bool = True) -> SweepResult:
    """Train one coder per (kind, value) at ``cfg.layer``, evaluate them together, write
    ``sweep.json`` into ``out``; returns its content. The figure (``result.figure``, ``sweep.png``
    in ``out``) is drawn by :func:`mechfaith.reports.sweep_plot.plot_sweep`."""
    out = Path(out)
    if not values:
        raise ConfigError("the sweep needs at least one sparsity value")
    unknown = [k for k in kinds if k not in SWEEP_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"sweep kinds must be among {', '.join(SWEEP_KINDS)}, got {list(kinds)}")
    param = sweep_param(coder_cfg.activation)
    if param == "k" and any(not float(v).is_integer() or v <= 0 for v in values):
        raise ConfigError(f"TopK sweep values are k (positive integers), got {list(values)}")
    if param == "sparsity_coef" and any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"sparsity coefficients must be finite numbers >= 0, got {list(values)}")
    for kind in kinds:  # every run's settings, before the model is loaded
        check_run_configs(dataclasses.replace(coder_cfg, kind=kind), train_cfg, "output")
    t0 = time.perf_counter()
    lm = get_model(cfg)
    layer = resolve_layer(lm.adapter, cfg.layer)
    cfg = dataclasses.replace(cfg, layer=layer)
    if activations is None:
        activations = out / ACTIVATIONS_DIR
        collect(cfg, corpus_cfg, activations, layers=[layer], progress=progress)
    settings: list[dict[str, Any]] = []
    coder_runs: list[CoderRun] = []
    for kind in kinds:
        for value in values:
            name = f"{kind}_{param}{value_label(value)}"
            ccfg = dataclasses.replace(coder_cfg, kind=kind)
            tcfg = train_cfg
            if param == "k":
                ccfg = dataclasses.replace(ccfg, k=int(value))
            else:
                tcfg = dataclasses.replace(train_cfg, sparsity_coef=float(value))
            coder_runs.append(prepare_coder_run(cfg, corpus_cfg, ccfg, tcfg, out / "runs" / name,
                                                activations=activations, sae_site="output", progress=progress))
            settings.append({"name": name, "kind": kind, "param": param, "value": value})
    # every coder trains from one read of the cache (the runs share the TrainConfig's seed and batch
    # size, so each sees the batches it would see alone), in one engine
    stream = coder_runs[0].stream([r.mode for r in coder_runs])
    log.info("sweep: training %d coders together", len(coder_runs))
    results = Engine([r.trainer for r in coder_runs], desc=f"sweep L{layer}").fit(stream)
    runs: list[dict[str, Any]] = []
    entries: dict[str, SpliceEntry] = {}
    diverged: TrainingDiverged | None = None
    for setting, run, res in zip(settings, coder_runs, results):
        try:
            summary = finish_coder_run(run, res)
        except TrainingDiverged as exc:  # write every run's train.json first
            diverged = diverged or exc
            continue
        entries[setting["name"]] = SpliceEntry(run.trainer.coder, layer, run.input_site, run.output_site)
        runs.append({**setting, "train_seconds": summary.train_seconds,
                     "final_train_metrics": summary.final_train_metrics})
    if diverged is not None:
        raise diverged
    contexts, source = eval_contexts(lm, corpus_cfg, cfg.eval_contexts)
    fcfg = FidelityConfig(batch_contexts=cfg.batch_contexts, exclude_bos=cfg.exclude_bos)
    t_eval = time.perf_counter()
    ev = evaluate_many(lm.adapter, contexts, entries, fcfg, progress=progress, desc="sweep eval")
    eval_seconds = time.perf_counter() - t_eval
    result = SweepResult(
        model=lm.name, family=lm.adapter.family.name, layer=layer, param=param, values=list(values),
        kinds=list(kinds), eval_source=source, eval_contexts=int(contexts.shape[0]), baseline=ev.baseline,
        runs=[SweepRun.of(r, entries[r["name"]], ev.coders[r["name"]]) for r in runs],
        eval_seconds=round(eval_seconds, 2), total_seconds=round(time.perf_counter() - t0, 2),
        figure=str(final_path(out / SWEEP_PNG)))
    write_json(out / SWEEP_JSON, result.to_json())
    return result
