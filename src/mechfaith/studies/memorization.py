"""The toy model's question on a real language model: does a transcoder of a real MLP memorize a
repeated passage that the MLP does not, and does Jacobian matching prevent it, at what cost?

:func:`run_experiment` plants a passage (by default a public-domain one) into a share of the
training contexts (``rates``), trains a transcoder of one MLP for every cell of
rates x {plain, Jacobian matching} x sparsity levels (TopK k) x seeds on otherwise identical data,
and measures every cell with :func:`mechfaith.studies.memorization_metrics.measure_cell`: memorization of
the passage, Jacobian error on held-out tokens and on the passage, FVE, L0 and the spliced CE.

Outputs in ``out``: ``experiment.json`` (config, data summary, every cell, the table of means and
standard deviations over seeds, and plain-language findings), ``cells/NAME/result.json`` per
cell (a rerun with the same settings reuses finished cells), optionally each cell's coder, and the
HTML report (written by :mod:`mechfaith.reports.experiment_report`).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_json, save_coder
from mechfaith.coders.init import init_from_data
from mechfaith.configs import config_to_dict, doc
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.faithfulness.datapoints import DatapointConfig
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.config import LMConfig, lm_train_config
from mechfaith.lm.corpus import CorpusConfig, eval_contexts, get_corpus
from mechfaith.lm.faithfulness import load_passage, tokenize_text
from mechfaith.lm.model_cache import get_model, resolve_layer
from mechfaith.studies.memorization_data import ExperimentData, build_experiment_data
from mechfaith.studies.memorization_metrics import measure_cell
from mechfaith.training.streams import TensorStream
from mechfaith.training.trainer import Trainer

log = logging.getLogger(__name__)

EXPERIMENT_JSON = "experiment.json"
CELL_JSON = "result.json"
SAVE_CODERS = ("none", "first_seed", "all")
# the metrics averaged over seeds in the table
TABLE_METRICS = ("memorization", "n_passage_features", "datapoint_flagged", "passage_mse_ratio",
                 "skip_passage_mse_ratio",
                 "passage_jacobian_rel", "jacobian_rel", "fve", "l0", "ce_increase", "kl",
                 "passage_ce_increase")


@dataclass
class ExperimentConfig:
    """The memorization experiment: which model and layer, which cells, how much training."""

    model: str = doc("Model (see mechfaith lm train --model).", "smollm2-135m")
    layer: int = doc("Layer whose MLP the transcoders replace (-1: the middle layer).", -1)
    rates: list[float] = doc("Shares of the training contexts that start with the passage.",
                             default_factory=lambda: [0.0, 0.01, 0.05])
    jacobian_coefs: list[float] = doc("Jacobian-matching coefficients of the cells (0 = plain "
                                      "training; 'with and without' is [0, c]).",
                                      default_factory=lambda: [0.0, 0.1])
    ks: list[int] = doc("Sparsity levels: active latents per token of the TopK transcoders.",
                        default_factory=lambda: [8, 32])
    seeds: list[int] = doc("Seeds (coder initialisation, data order, probes) of every cell.",
                           default_factory=lambda: [0, 1])
    n_latents: int = doc("Latents per transcoder.", 2304)
    skip: bool = doc("Linear skip connection (least-squares initialised). A linear map can fit a short "
                     "passage too: the report says how much of the passage's fit the skip alone gives.", True)
    steps: int = doc("Training steps per cell.", 300)
    batch_size: int = doc("Rows (tokens) per training step.", 1024)
    lr: float = doc("Adam learning rate.", 5e-4)
    n_probes: int = doc("Gaussian probes per row for Jacobian matching during training.", 1)
    train_tokens: int = doc("Training tokens collected (BOS excluded); the steps revisit them "
                            "when steps x batch_size is larger.", 150_000)
    passage: str = doc("The repeated passage: 'default' (a fixed public-domain passage) or a path "
                       "to a text file.", "default")
    eval_contexts: int = doc("Held-out contexts for FVE, L0, Jacobian error and spliced CE.", 32)
    passage_eval_contexts: int = doc("Held-out contexts with the passage planted, for the "
                                     "passage's spliced CE.", 4)
    detector_contexts: int = doc("Held-out contexts of the datapoint detector's sample.", 32)
    detector_rate: float = doc("Share of the detector's contexts with the passage planted.", 0.25)
    exclusive_rate: float = doc("A feature counts as a passage feature when it fires on the "
                                "passage and on at most this share of held-out tokens.", 1e-3)
    jacobian_rows: int = doc("Held-out rows of the Jacobian-error estimate.", 2048)
    eval_probes: int = doc("Probes per row of the held-out Jacobian-error estimate.", 4)
    batch_contexts: int = doc("Contexts per forward pass of the model.", 16)
    save_coders: str = doc("Which cells' coders to save under cells/NAME/coder.", "first_seed",
                           choices=SAVE_CODERS)
    device: str = doc("Torch device.", "cpu")
    dtype: str = doc("dtype of the model's weights.", "float32", choices=("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        if not self.rates or any(not 0 <= r <= 1 for r in self.rates):
            raise ConfigError(f"ExperimentConfig.rates must be shares in [0, 1], got {self.rates}")
        if not self.jacobian_coefs or any(c < 0 for c in self.jacobian_coefs):
            raise ConfigError(f"ExperimentConfig.jacobian_coefs must be >= 0, got {self.jacobian_coefs}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ExperimentConfig.ks must be positive, got {self.ks}")
        if not self.seeds:
            raise ConfigError("ExperimentConfig.seeds is empty")
        for name in ("n_latents", "steps", "batch_size", "train_tokens", "eval_contexts",
                     "passage_eval_contexts", "detector_contexts", "jacobian_rows", "eval_probes",
                     "batch_contexts", "n_probes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ExperimentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if max(self.ks) > self.n_latents:
            raise ConfigError(f"ExperimentConfig: k {max(self.ks)} exceeds n_latents {self.n_latents}")
        if not 0 < self.detector_rate <= 1 or not 0 <= self.exclusive_rate < 1:
            raise ConfigError("ExperimentConfig: detector_rate must be in (0, 1], exclusive_rate in [0, 1)")
        if self.lr <= 0:
            raise ConfigError(f"ExperimentConfig.lr must be positive, got {self.lr}")


# The --quick variant: the same design, smaller (about 3-4 minutes for SmolLM2 on 2 CPU cores).
QUICK: dict[str, Any] = {"rates": [0.0, 0.05], "ks": [16], "steps": 100, "train_tokens": 40_000,
                         "eval_contexts": 16, "detector_contexts": 16, "jacobian_rows": 1024,
                         "passage_eval_contexts": 2}


def cell_name(rate: float, coef: float, k: int, seed: int) -> str:
    return f"rate{rate:g}_jac{coef:g}_k{k}_seed{seed}"


def _cells(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    return [{"name": cell_name(r, c, k, s), "rate": r, "jacobian_coef": c, "k": k, "seed": s}
            for r in cfg.rates for c in cfg.jacobian_coefs for k in cfg.ks for s in cfg.seeds]


def _cell_key(cfg: ExperimentConfig, cell: dict[str, Any], data: ExperimentData) -> dict[str, Any]:
    """What a finished cell's result depends on (a rerun reuses it only when this matches)."""
    keep = {k: v for k, v in config_to_dict(cfg).items() if k not in ("rates", "jacobian_coefs", "ks",
                                                                       "seeds", "save_coders", "device")}
    return {**keep, **{k: cell[k] for k in ("rate", "jacobian_coef", "k", "seed")},
            "data": data.summary()}


def train_cell(data: ExperimentData, reference: Callable, cfg: ExperimentConfig, cell: dict[str, Any],
               progress: bool = False) -> tuple[SparseCoder, dict[str, Any]]:
    """Train the transcoder of one cell on the training rows planted at its rate."""
    x, y = data.training_rows(cell["rate"])
    d_in, d_out = x.shape[1], y.shape[1]
    ccfg = CoderConfig(d_in=d_in, n_latents=cfg.n_latents, d_out=d_out, activation="topk", k=cell["k"],
                       skip=cfg.skip, init_scale=1.0)
    coder = SparseCoder(ccfg, generator=torch.Generator().manual_seed(cell["seed"]))
    gen = torch.Generator().manual_seed(cell["seed"])
    init_rows = torch.randperm(x.shape[0], generator=gen)[:65536]
    xi, yi = x[init_rows], y[init_rows]
    init_from_data(coder, xi, yi, skip_init="lstsq", latent_init_fraction=0.3, center_encoder=True)
    tcfg = lm_train_config(n_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cell["seed"],
                           jacobian_coef=cell["jacobian_coef"], n_probes=cfg.n_probes,
                           log_every=max(cfg.steps, 1), checkpoint_every=0, device=cfg.device,
                           lr_warmup_steps=min(20, max(cfg.steps // 5, 1)))
    batch = min(cfg.batch_size, x.shape[0])
    stream = TensorStream(x.to(cfg.device), y.to(cfg.device), batch_size=batch, seed=cell["seed"])
    trainer = Trainer(coder.to(cfg.device), tcfg, reference if cell["jacobian_coef"] > 0 else None,
                      progress=progress, desc=cell["name"])
    result = trainer.fit(stream)
    if not result.ok:
        raise TrainingDiverged(f"cell {cell['name']}: {result.message or 'training diverged'}")
    final = {k: result.final_metrics.get(k) for k in ("fve", "l0", "dead_frac", "jacobian_rel")
             if result.final_metrics.get(k) is not None}
    return coder.eval(), {"train_seconds": round(result.elapsed_s, 2), "train_metrics": final,
                          "planted_contexts": data.rate_contexts(cell["rate"])}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of (rate, jacobian_coef, k) with the mean and SD over seeds of every table metric."""
    groups: dict[tuple[float, float, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["rate"], c["jacobian_coef"], c["k"]), []).append(c)
    rows = []
    for (rate, coef, k), members in sorted(groups.items()):
        row: dict[str, Any] = {"rate": rate, "jacobian_coef": coef, "k": k, "seeds": len(members)}
        for m in TABLE_METRICS:
            mean, sd = _mean_sd([c["metrics"][m] for c in members])
            row[m], row[m + "_sd"] = mean, sd
        rows.append(row)
    return rows


def _row(rows: list[dict[str, Any]], rate: float, coef: float, k: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["rate"] == rate and r["jacobian_coef"] == coef and r["k"] == k), None)


# Smallest difference worth a word, per metric (memorization: 1% of the passage's output).
MIN_EFFECT = {"memorization": 0.01, "passage_mse_ratio": 0.05, "passage_jacobian_rel": 0.01}


def _clear(a: dict[str, Any], b: dict[str, Any], metric: str) -> bool:
    """Whether ``a`` and ``b`` differ in ``metric`` by more than twice the seeds' spread and by at
    least the metric's smallest effect worth reporting (:data:`MIN_EFFECT`)."""
    spread = math.hypot(a[metric + "_sd"], b[metric + "_sd"])
    diff = abs(a[metric] - b[metric])
    return diff > 2 * spread and diff >= MIN_EFFECT.get(metric, 1e-9)


def _change(a: dict[str, Any], b: dict[str, Any], metric: str) -> str:
    if not _clear(a, b, metric):
        return "no clear change"
    return "a clear rise" if b[metric] > a[metric] else "a clear fall"


def _carrier(row: dict[str, Any]) -> str:
    """Whether the linear skip or the latents carry a coder's fit of the passage."""
    skip, whole = row.get("skip_passage_mse_ratio", math.nan), row["passage_mse_ratio"]
    if not math.isfinite(skip):
        return ""
    who = "almost entirely by the linear skip" if whole >= 0.85 * skip else "mostly by the latents"
    return f"; carried {who} (passage MSE ratio of the skip alone {skip:.3g}, of the whole coder {whole:.3g})"


def findings(rows: list[dict[str, Any]], cfg: ExperimentConfig) -> list[str]:
    """Plain-language statements of what the table shows (null results included). A difference is
    called clear when it exceeds twice the spread over seeds (sqrt of the summed variances)."""
    out: list[str] = []
    lo, hi = min(cfg.rates), max(cfg.rates)
    plain = min(cfg.jacobian_coefs)
    jm = [c for c in cfg.jacobian_coefs if c != plain]
    for k in cfg.ks:
        for coef in cfg.jacobian_coefs:
            a, b = _row(rows, lo, coef, k), _row(rows, hi, coef, k)
            if a is None or b is None or lo == hi:
                continue
            label = "plain" if coef == plain and coef == 0 else f"Jacobian coef {coef:g}"
            verdict = "rises clearly" if _clear(a, b, "memorization") and b["memorization"] > a["memorization"] \
                else "falls clearly" if _clear(a, b, "memorization") else "shows no clear change"
            skip = (f" (the linear skip alone: {a['skip_passage_mse_ratio']:.3g} -> {b['skip_passage_mse_ratio']:.3g})"
                    if math.isfinite(a.get("skip_passage_mse_ratio", math.nan)) else "")
            out.append(
                f"k={k}, {label}: memorization by passage features {verdict} from rate {lo:g} to {hi:g} "
                f"({a['memorization']:.3g} ± {a['memorization_sd']:.2g} -> {b['memorization']:.3g} ± "
                f"{b['memorization_sd']:.2g}; passage features {a['n_passage_features']:.3g} -> "
                f"{b['n_passage_features']:.3g}). The fit of the passage shows "
                f"{_change(a, b, 'passage_mse_ratio')}: passage MSE / held-out MSE {a['passage_mse_ratio']:.3g} -> "
                f"{b['passage_mse_ratio']:.3g}{skip}; the passage's Jacobian error shows "
                f"{_change(a, b, 'passage_jacobian_rel')} ({a['passage_jacobian_rel']:.3g} -> "
                f"{b['passage_jacobian_rel']:.3g}).")
            if (_clear(a, b, "passage_mse_ratio") and b["passage_mse_ratio"] < a["passage_mse_ratio"]
                    and not (_clear(a, b, "passage_jacobian_rel")
                             and b["passage_jacobian_rel"] < a["passage_jacobian_rel"])):
                out.append(
                    f"k={k}, {label}: the coder fits the passage's outputs better without fitting the MLP's "
                    f"local function there any better: memorization of the outputs, not of the mechanism "
                    f"(the toy model's signature of unfaithfulness)"
                    + ("; no dedicated passage features carry it: it is spread over features that also "
                       "fire on ordinary text" if not _clear(a, b, "memorization") else "") + _carrier(b) + ".")
        for coef in jm:
            p, j = _row(rows, hi, plain, k), _row(rows, hi, coef, k)
            if p is None or j is None:
                continue
            mem = ("lowers memorization clearly" if _clear(p, j, "memorization") and j["memorization"] < p["memorization"]
                   else "raises memorization clearly" if _clear(p, j, "memorization")
                   else "does not change memorization clearly")
            fit = ("fits the passage clearly less well" if _clear(p, j, "passage_mse_ratio")
                   and j["passage_mse_ratio"] > p["passage_mse_ratio"] else
                   "fits the passage clearly better" if _clear(p, j, "passage_mse_ratio") else
                   "fits the passage about as well")
            out.append(
                f"k={k}, rate {hi:g}: Jacobian matching (coef {coef:g}) {mem} "
                f"({p['memorization']:.3g} -> {j['memorization']:.3g}) and {fit} (passage MSE / held-out "
                f"MSE {p['passage_mse_ratio']:.3g} -> {j['passage_mse_ratio']:.3g}); held-out Jacobian error "
                f"{p['jacobian_rel']:.3g} -> {j['jacobian_rel']:.3g}, passage Jacobian error "
                f"{p['passage_jacobian_rel']:.3g} -> {j['passage_jacobian_rel']:.3g}; cost: FVE "
                f"{p['fve']:.3g} -> {j['fve']:.3g}, spliced CE increase {p['ce_increase']:.3g} -> "
                f"{j['ce_increase']:.3g} nats.")
    return out


def run_experiment(cfg: ExperimentConfig, corpus_cfg: CorpusConfig, out: str | Path, *,
                   progress: bool = True, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every cell (module docstring); returns (and writes) the experiment's JSON."""
    t0 = time.perf_counter()
    out = Path(out)
    say = on_stage or (lambda s: log.info("experiment: %s", s))
    lm = get_model(LMConfig(model=cfg.model, device=cfg.device, dtype=cfg.dtype))
    adapter = lm.adapter
    layer = resolve_layer(adapter, cfg.layer)
    in_site, out_site = "mlp_in", "mlp_out"
    text = load_passage(cfg.passage)
    if text is None:
        raise ConfigError("the experiment needs a passage ('default' or a text file), not 'none'")
    ids = tokenize_text(lm, text)
    corpus = get_corpus(lm, corpus_cfg)
    n_train = math.ceil(cfg.train_tokens / (corpus_cfg.context_length - 1))
    train = corpus.train[:n_train]
    if train.shape[0] < n_train:
        log.warning("the corpus has only %d training contexts; using all of them", train.shape[0])
    held, eval_source = eval_contexts(lm, corpus_cfg, max(cfg.eval_contexts, cfg.detector_contexts,
                                                          cfg.passage_eval_contexts))
    data = build_experiment_data(
        adapter, train, held, ids, layer=layer, input_site=in_site, output_site=out_site,
        max_rate=max(cfg.rates), eval_contexts=cfg.eval_contexts, passage_eval_contexts=cfg.passage_eval_contexts,
        detector_contexts=cfg.detector_contexts, detector_rate=cfg.detector_rate,
        batch_contexts=cfg.batch_contexts, train_source=corpus_cfg.source, eval_source=eval_source,
        on_stage=say, progress=progress)
    collect_seconds = time.perf_counter() - t0
    reference = adapter.mlp_function(layer, in_site, out_site)
    cells = _cells(cfg)
    results: list[dict[str, Any]] = []
    clean_cache: dict[str, Any] = {}
    bar = tqdm(cells, desc="experiment cells", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell["name"])
        folder = out / "cells" / cell["name"]
        key = _cell_key(cfg, cell, data)
        path = folder / CELL_JSON
        if path.is_file():
            try:
                old = read_json(path)
            except Exception:  # noqa: BLE001 - a damaged result is recomputed
                old = {}
            if old.get("key") == key:
                results.append(old)
                continue
        tc = time.perf_counter()
        coder, train_info = train_cell(data, reference, cfg, cell, progress=False)
        metrics = measure_cell(coder, reference, data, adapter=adapter, layer=layer, input_site=in_site,
                               output_site=out_site, jacobian_rows=cfg.jacobian_rows, n_probes=cfg.eval_probes,
                               exclusive_rate=cfg.exclusive_rate, batch_contexts=cfg.batch_contexts,
                               seed=cell["seed"], clean_cache=clean_cache,
                               detector=DatapointConfig(top_k=16))
        payload = {**cell, **train_info, "metrics": metrics, "key": key,
                   "seconds": round(time.perf_counter() - tc, 2)}
        if cfg.save_coders == "all" or (cfg.save_coders == "first_seed" and cell["seed"] == cfg.seeds[0]):
            save_coder(coder, folder / "coder", training={
                "source": "mechfaith faithfulness experiment", "model": lm.name, "layer": layer,
                "input_site": in_site, "output_site": out_site, "corpus": config_to_dict(corpus_cfg),
                "cell": cell})
        write_json(folder / CELL_JSON, payload)
        results.append(payload)
        log.info("cell %s: memorization %.3g, FVE %.3g, CE +%.3g (%.0f s)", cell["name"],
                 metrics["memorization"], metrics["fve"], metrics["ce_increase"], payload["seconds"])
    bar.close()
    rows = summarize(results)
    report = {
        "format": "mechfaith.experiment", "version": 1, "model": lm.name, "layer": layer,
        "input_site": in_site, "output_site": out_site, "passage": text, "config": config_to_dict(cfg),
        "corpus": config_to_dict(corpus_cfg), "data": data.summary(), "cells": results, "table": rows,
        "findings": findings(rows, cfg), "collect_seconds": round(collect_seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out / EXPERIMENT_JSON, json_safe(report))
    report["path"] = str(out / EXPERIMENT_JSON)
    return report


__all__ = ["EXPERIMENT_JSON", "ExperimentConfig", "QUICK", "cell_name", "findings", "run_experiment", "summarize", "train_cell"]
