"""The toy model's question on a real language model: does a transcoder of a real MLP memorize a
repeated passage that the MLP does not, and does Jacobian matching prevent it, at what cost?

:func:`run_experiment` plants a passage into a share of the training contexts (``rates``) and
trains transcoders of one MLP on otherwise identical data, for every cell of its grid (see
:mod:`mechfaith.studies.memorization_config`): sites (passage, layer) x arms (TopK / ReLU with the
toy's tanh-L1 / JumpReLU, each with or without a linear skip; :mod:`mechfaith.studies.memorization_arms`)
x rates x {plain, Jacobian matching} x (TopK k) x seeds. Every cell is measured by
:func:`mechfaith.studies.memorization_metrics.measure_cell`: memorization of the passage, the
passage-specific (10x) features, the linear and feature parts of the passage's fit, Jacobian error
on held-out tokens and on the passage, FVE, L0 and the spliced CE.

Outputs in ``out``: ``experiment.json`` (config, data summary per site, every cell, the table of
means and standard deviations over seeds, and plain-language findings), ``cells/NAME/result.json``
per cell (a rerun reuses every finished cell whose own settings are unchanged, also when arms, sites
or rates were added), optionally each cell's coder, and the HTML report (written by
:mod:`mechfaith.reports.experiment_report`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from mechfaith.atomic import final_path
from mechfaith.coders.files import save_coder
from mechfaith.configs import config_to_dict
from mechfaith.faithfulness.datapoints import DatapointConfig
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.config import LMConfig
from mechfaith.lm.corpus import CorpusConfig, eval_contexts, get_corpus, model_tokenizer
from mechfaith.lm.faithfulness import tokenize_text
from mechfaith.lm.model_cache import get_model, resolve_layer
from mechfaith.studies.memorization_cells import (
    CellResult,
    cell_key,
    cell_name,
    finished_cell,
    passage_label,
    site_cells,
    train_cell,
)
from mechfaith.studies.memorization_config import QUICK, ExperimentConfig, passage_text
from mechfaith.studies.memorization_data import ExperimentData, build_experiment_data
from mechfaith.studies.memorization_findings import findings, summarize
from mechfaith.studies.memorization_metrics import measure_cell
from mechfaith.studies.memorization_specific import token_strings

log = logging.getLogger(__name__)

EXPERIMENT_JSON = "experiment.json"
CELL_JSON = "result.json"


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` wrote to ``experiment.json`` (``path``: where).

    ``passages`` maps each passage's label to its text, ``data`` each site (``LABEL_L<layer>``) to its
    data summary. ``table``: one row per (passage, layer, arm, rate, jacobian_coef, k) with the mean
    (``metric``) and the SD over seeds (``metric_sd``) of every :data:`TABLE_METRICS` entry."""

    model: str
    layers: list[int]
    input_site: str
    output_site: str
    passages: dict[str, str]
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
        return json_safe({"format": "mechfaith.experiment", "version": 2, **body,
                          "cells": [c.to_json() for c in self.cells]})


@dataclass
class _Run:
    """What every site of one run shares: the model, its contexts, where to write."""

    lm: Any
    corpus_cfg: CorpusConfig
    train: Any
    held: Any
    eval_source: str
    out: Path
    say: Callable[[str], None]
    progress: bool


def _site_data(run: _Run, cfg: ExperimentConfig, layer: int, ids: list[int],
               reuse: ExperimentData | None) -> ExperimentData:
    return build_experiment_data(
        run.lm.adapter, run.train, run.held, ids, layer=layer, input_site="mlp_in", output_site="mlp_out",
        max_rate=max(cfg.rates), eval_contexts=cfg.eval_contexts, passage_eval_contexts=cfg.passage_eval_contexts,
        detector_contexts=cfg.detector_contexts, detector_rate=cfg.detector_rate,
        batch_contexts=cfg.batch_contexts, train_source=run.corpus_cfg.source, eval_source=run.eval_source,
        on_stage=run.say, progress=run.progress, reuse=reuse)


def _run_cell(run: _Run, cfg: ExperimentConfig, cell: dict[str, Any], data: ExperimentData, text: str,
              tokens: list[str], clean_cache: dict[str, Any]) -> CellResult:
    """The cell's result: reused when finished with the same settings, else trained and measured."""
    folder = run.out / "cells" / cell["name"]
    key = cell_key(cfg, cell, data, text)
    done = finished_cell(folder / CELL_JSON, key)
    if done is not None:
        return done
    layer = cell["layer"]
    reference = run.lm.adapter.mlp_function(layer, "mlp_in", "mlp_out")
    tc = time.perf_counter()
    coder, train_info = train_cell(data, reference, cfg, cell, progress=False)
    metrics = measure_cell(coder, reference, data, adapter=run.lm.adapter, layer=layer, input_site="mlp_in",
                           output_site="mlp_out", jacobian_rows=cfg.jacobian_rows, n_probes=cfg.eval_probes,
                           exclusive_rate=cfg.exclusive_rate, batch_contexts=cfg.batch_contexts,
                           seed=cell["seed"], specific_ratio=cfg.specific_ratio, passage_tokens=tokens,
                           clean_cache=clean_cache, detector=DatapointConfig(top_k=16))
    result = CellResult(**cell, **train_info, metrics=metrics, key=key, seconds=round(time.perf_counter() - tc, 2))
    if cfg.save_coders == "all" or (cfg.save_coders == "first_seed" and cell["seed"] == cfg.seeds[0]):
        save_coder(coder, folder / "coder", training={
            "source": "mechfaith faithfulness experiment", "model": run.lm.name, "layer": layer,
            "input_site": "mlp_in", "output_site": "mlp_out", "corpus": config_to_dict(run.corpus_cfg),
            "cell": cell})
    write_json(folder / CELL_JSON, result.to_json())
    log.info("cell %s: memorization %.3g, 10x features %d, FVE %.3g, CE +%.3g (%.0f s)", cell["name"],
             metrics["memorization"], metrics["n_specific_features"], metrics["fve"], metrics["ce_increase"],
             result.seconds)
    return result


def run_experiment(cfg: ExperimentConfig, corpus_cfg: CorpusConfig, out: str | Path, *,
                   progress: bool = True, on_stage: Callable[[str], None] | None = None) -> ExperimentResult:
    """Run every cell (module docstring); returns (and writes) the experiment's JSON."""
    t0 = time.perf_counter()
    say = on_stage or (lambda s: log.info("experiment: %s", s))
    lm = get_model(LMConfig(model=cfg.model, device=cfg.device, dtype=cfg.dtype))
    tokenizer, _ = model_tokenizer(lm)
    corpus = get_corpus(lm, corpus_cfg)
    n_train = math.ceil(cfg.train_tokens / (corpus_cfg.context_length - 1))
    train = corpus.train[:n_train]
    if train.shape[0] < n_train:
        log.warning("the corpus has only %d training contexts; using all of them", train.shape[0])
    held, eval_source = eval_contexts(lm, corpus_cfg, max(cfg.eval_contexts, cfg.detector_contexts,
                                                          cfg.passage_eval_contexts))
    run = _Run(lm, corpus_cfg, train, held, eval_source, Path(out), say, progress)
    sites = [(p, resolve_layer(lm.adapter, layer), arms) for p, layer, arms in cfg.sites()]
    texts = {passage_label(p): passage_text(p) for p, _, _ in sites}
    n_cells = sum(len(site_cells(cfg, p, layer, arms, i == 0)) for i, (p, layer, arms) in enumerate(sites))
    bar = tqdm(total=n_cells, desc="experiment cells", unit="cell", disable=not progress)
    results: list[CellResult] = []
    summaries: dict[str, Any] = {}
    collect_seconds = 0.0
    base: ExperimentData | None = None
    for i, (passage, layer, arms) in enumerate(sites):
        tcol = time.perf_counter()
        text = passage_text(passage)
        ids = tokenize_text(lm, text)
        reuse = base if base is not None and base.layer == layer else None
        data = _site_data(run, cfg, layer, ids, reuse)
        base = data
        collect_seconds += time.perf_counter() - tcol
        summaries[f"{passage_label(passage)}_L{layer}"] = data.summary()
        tokens = token_strings(tokenizer, data.passage_ids)
        clean_cache: dict[str, Any] = {}
        for cell in site_cells(cfg, passage, layer, arms, i == 0):
            bar.set_postfix_str(cell["name"])
            results.append(_run_cell(run, cfg, cell, data, text, tokens, clean_cache))
            bar.update(1)
    bar.close()
    rows = summarize(results)
    report = ExperimentResult(
        model=lm.name, layers=sorted({layer for _, layer, _ in sites}, key=[s[1] for s in sites].index),
        input_site="mlp_in", output_site="mlp_out", passages=texts, config=config_to_dict(cfg),
        corpus=config_to_dict(corpus_cfg), data=summaries, cells=results, table=rows,
        findings=findings(rows, cfg), collect_seconds=round(collect_seconds, 2),
        seconds=round(time.perf_counter() - t0, 2), path=str(final_path(Path(out) / EXPERIMENT_JSON)))
    write_json(Path(out) / EXPERIMENT_JSON, report.to_json())
    return report


__all__ = ["CELL_JSON", "EXPERIMENT_JSON", "QUICK", "CellResult", "ExperimentConfig", "ExperimentResult",
           "cell_name", "run_experiment", "train_cell"]
