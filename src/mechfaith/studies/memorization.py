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

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from mechfaith.atomic import final_path
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import read_json, save_coder
from mechfaith.coders.init import init_from_data
from mechfaith.configs import check_finite, config_to_dict, doc
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.faithfulness.datapoints import DatapointConfig
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.config import LMConfig, lm_train_config
from mechfaith.lm.corpus import CorpusConfig, eval_contexts, get_corpus
from mechfaith.lm.faithfulness import load_passage, tokenize_text
from mechfaith.lm.model_cache import get_model, resolve_layer
from mechfaith.studies.memorization_data import ExperimentData, build_experiment_data
from mechfaith.studies.memorization_findings import findings, summarize
from mechfaith.studies.memorization_metrics import measure_cell
from mechfaith.training.streams import TensorStream
from mechfaith.training.trainer import Trainer

log = logging.getLogger(__name__)

EXPERIMENT_JSON = "experiment.json"
CELL_JSON = "result.json"
SAVE_CODERS = ("none", "first_seed", "all")


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
    device: str = doc("Torch device.", "cpu", kind="device")
    dtype: str = doc("dtype of the model's weights.", "float32", choices=("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        check_finite(self)
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


@dataclass
class CellResult:
    """One cell: its setting, how its training went, and its measurements (``cells/NAME/result.json``).

    ``metrics`` maps each measurement of :func:`~mechfaith.studies.memorization_metrics.measure_cell`
    to its value (memorization, FVE, L0, Jacobian errors, spliced CE, ...)."""

    name: str
    rate: float
    jacobian_coef: float
    k: int
    seed: int
    train_seconds: float
    train_metrics: dict[str, float]
    planted_contexts: int
    metrics: dict[str, Any]
    key: dict[str, Any]  # every setting the result depends on (a rerun reuses the cell when it matches)
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CellResult:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` wrote to ``experiment.json`` (``path``: where).

    ``table``: one row per (rate, jacobian_coef, k) with the mean (``metric``) and the SD over
    seeds (``metric_sd``) of every :data:`TABLE_METRICS` entry."""

    model: str
    layer: int
    input_site: str
    output_site: str
    passage: str
    config: dict[str, Any]
    corpus: dict[str, Any]
    data: dict[str, Any]
    cells: list[CellResult]
    table: list[dict[str, Any]]
    findings: list[str]
    collect_seconds: float
    seconds: float
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("cells", "path")}
        return json_safe({"format": "mechfaith.experiment", "version": 1, **body,
                          "cells": [c.to_json() for c in self.cells]})


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


def _finished_cell(path: Path, key: dict[str, Any]) -> CellResult | None:
    """The result of a cell finished earlier with the same settings, or None (missing, damaged,
    written by other settings)."""
    if not path.is_file():
        return None
    try:
        old = read_json(path)
        return CellResult.from_json(old) if isinstance(old, dict) and old.get("key") == key else None
    except Exception:  # noqa: BLE001 - a damaged result is recomputed
        return None


def run_experiment(cfg: ExperimentConfig, corpus_cfg: CorpusConfig, out: str | Path, *,
                   progress: bool = True, on_stage: Callable[[str], None] | None = None) -> ExperimentResult:
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
    results: list[CellResult] = []
    clean_cache: dict[str, Any] = {}
    bar = tqdm(cells, desc="experiment cells", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell["name"])
        folder = out / "cells" / cell["name"]
        key = _cell_key(cfg, cell, data)
        done = _finished_cell(folder / CELL_JSON, key)
        if done is not None:
            results.append(done)
            continue
        tc = time.perf_counter()
        coder, train_info = train_cell(data, reference, cfg, cell, progress=False)
        metrics = measure_cell(coder, reference, data, adapter=adapter, layer=layer, input_site=in_site,
                               output_site=out_site, jacobian_rows=cfg.jacobian_rows, n_probes=cfg.eval_probes,
                               exclusive_rate=cfg.exclusive_rate, batch_contexts=cfg.batch_contexts,
                               seed=cell["seed"], clean_cache=clean_cache,
                               detector=DatapointConfig(top_k=16))
        result = CellResult(**cell, **train_info, metrics=metrics, key=key,
                            seconds=round(time.perf_counter() - tc, 2))
        if cfg.save_coders == "all" or (cfg.save_coders == "first_seed" and cell["seed"] == cfg.seeds[0]):
            save_coder(coder, folder / "coder", training={
                "source": "mechfaith faithfulness experiment", "model": lm.name, "layer": layer,
                "input_site": in_site, "output_site": out_site, "corpus": config_to_dict(corpus_cfg),
                "cell": cell})
        write_json(folder / CELL_JSON, result.to_json())
        results.append(result)
        log.info("cell %s: memorization %.3g, FVE %.3g, CE +%.3g (%.0f s)", cell["name"],
                 metrics["memorization"], metrics["fve"], metrics["ce_increase"], result.seconds)
    bar.close()
    rows = summarize(results)
    report = ExperimentResult(
        model=lm.name, layer=layer, input_site=in_site, output_site=out_site, passage=text,
        config=config_to_dict(cfg), corpus=config_to_dict(corpus_cfg), data=data.summary(), cells=results,
        table=rows, findings=findings(rows, cfg), collect_seconds=round(collect_seconds, 2),
        seconds=round(time.perf_counter() - t0, 2), path=str(final_path(out / EXPERIMENT_JSON)))
    write_json(out / EXPERIMENT_JSON, report.to_json())
    return report


__all__ = ["EXPERIMENT_JSON", "CellResult", "ExperimentConfig", "ExperimentResult", "QUICK", "cell_name",
           "run_experiment", "train_cell"]
