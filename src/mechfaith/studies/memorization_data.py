"""The activations of the memorization experiment (:mod:`mechfaith.studies.memorization`), held in memory.

One pass collects what every cell of the experiment needs, so that the cells differ only in
the rows they train on:

- the training contexts (the corpus's training split) and their MLP (input, output) pairs, BOS
  position dropped: [n_contexts, L - 1, d];
- the *planted* versions of the first ``round(max_rate * n)`` contexts of a fixed seeded
  permutation (positions 1.. replaced by the passage's tokens, as :func:`plant_repeats` does).
  The contexts planted at a rate r are the first ``round(r * n)`` of the same permutation, so the
  planted sets are nested (1% is a subset of 5%) and one collection serves every rate;
- held-out contexts (validation documents) for FVE, L0, the Jacobian error, firing rates on
  ordinary text and the spliced CE;
- the passage's own rows (positions 1..m of one planted held-out context: the repeated inputs,
  identical in every planted context) and a few planted held-out contexts for the passage's
  spliced CE;
- a detector sample: held-out contexts with the passage planted into a share of them, with
  context keys, for the datapoint-feature detector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechfaith.errors import ConfigError, InputError
from mechfaith.lm.faithfulness import collect_inputs, context_keys, plant_repeats

log = logging.getLogger(__name__)


@dataclass
class ExperimentData:
    """Every tensor the experiment's cells share (shapes in the field comments; d = d_model)."""

    x_train: Tensor  # [n, L-1, d] training inputs (BOS dropped)
    y_train: Tensor  # [n, L-1, d] training targets
    plant_order: Tensor  # [n] int64: contexts planted at rate r are plant_order[:round(r n)]
    x_planted: Tensor  # [n_max, L-1, d] planted versions of plant_order[:n_max]
    y_planted: Tensor  # [n_max, L-1, d]
    eval_contexts: Tensor  # [n_eval, L] int64 held-out contexts
    x_eval: Tensor  # [n_eval * (L-1), d] held-out inputs (BOS dropped)
    y_eval: Tensor  # [n_eval * (L-1), d]
    passage_ids: list[int]  # the passage's tokens (cut to L - 1)
    x_passage: Tensor  # [m, d] inputs at the passage's positions 1..m
    y_passage: Tensor  # [m, d]
    passage_contexts: Tensor  # [n_pe, L] held-out contexts with the passage planted (spliced CE)
    x_detector: Tensor  # [n_det * (L-1), d] detector sample (held-out contexts, some planted)
    detector_keys: Tensor  # [n_det * (L-1)] int64 context keys
    detector_planted: int  # planted contexts in the detector sample
    train_source: str
    eval_source: str
    layer: int = -1  # the layer the rows were collected at

    def rate_contexts(self, rate: float) -> int:
        """How many training contexts are planted at ``rate``."""
        return int(round(rate * self.x_train.shape[0]))

    def training_rows(self, rate: float) -> tuple[Tensor, Tensor]:
        """(x, y) [rows, d] of the training set with the passage planted at ``rate``."""
        k = self.rate_contexts(rate)
        if k > self.x_planted.shape[0]:
            raise ConfigError(f"rate {rate} needs {k} planted contexts; only {self.x_planted.shape[0]} "
                              "were collected (the largest rate of the experiment)")
        x, y = self.x_train, self.y_train
        if k > 0:
            x, y = x.clone(), y.clone()
            idx = self.plant_order[:k]
            x[idx] = self.x_planted[:k]
            y[idx] = self.y_planted[:k]
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])

    def summary(self) -> dict[str, Any]:
        n, length = self.x_train.shape[0], self.x_train.shape[1] + 1
        return {"train_contexts": int(n), "context_length": int(length),
                "train_tokens": int(n * (length - 1)), "planted_contexts_collected": int(self.x_planted.shape[0]),
                "eval_contexts": int(self.eval_contexts.shape[0]), "eval_tokens": int(self.x_eval.shape[0]),
                "passage_tokens": len(self.passage_ids),
                "passage_eval_contexts": int(self.passage_contexts.shape[0]),
                "detector_rows": int(self.x_detector.shape[0]), "detector_planted_contexts": self.detector_planted,
                "train_source": self.train_source, "eval_source": self.eval_source}


def _collect(adapter: Any, contexts: Tensor, layer: int, in_site: str, out_site: str,
             batch_contexts: int, progress: bool = False) -> tuple[Tensor, Tensor]:
    """(x, y) [n, L-1, d] with the BOS position dropped (float32)."""
    x, y, _ = collect_inputs(adapter, contexts, layer, in_site, out_site, batch_contexts, progress)
    n, length = contexts.shape
    return (x.reshape(n, length, -1)[:, 1:].contiguous(), y.reshape(n, length, -1)[:, 1:].contiguous())


def build_experiment_data(adapter: Any, train: Tensor, held_out: Tensor, passage_ids: list[int], *,
                          layer: int, input_site: str, output_site: str, max_rate: float,
                          eval_contexts: int, passage_eval_contexts: int, detector_contexts: int,
                          detector_rate: float, key_window: int = 16, batch_contexts: int = 16,
                          plant_seed: int = 0, train_source: str = "", eval_source: str = "",
                          on_stage: Any = None, progress: bool = False,
                          reuse: ExperimentData | None = None) -> ExperimentData:
    """Collect the experiment's tensors (module docstring) from ``train`` [n, L] and ``held_out``
    [n_h, L] contexts. ``on_stage``: optional callable(str) told about each stage; ``progress``:
    a progress bar for the training contexts' collection. ``reuse``: the data of another passage
    collected from the same contexts at the same layer and sites, whose unplanted training and
    held-out rows are taken as they are (only the passage's rows are collected)."""
    say = on_stage or (lambda s: log.info("experiment data: %s", s))
    if train.ndim != 2 or held_out.ndim != 2 or train.shape[1] != held_out.shape[1]:
        raise InputError("train and held-out contexts must be [n, L] with the same L")
    length = train.shape[1]
    if length < 3:
        raise ConfigError(f"contexts of {length} tokens are too short for the experiment")
    ids = list(passage_ids)[: length - 1]
    if not ids:
        raise InputError("the passage has no tokens")
    n = train.shape[0]
    n_max = int(round(max_rate * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(plant_seed))
    if reuse is not None and reuse.x_train.shape[:2] == (n, length - 1):
        x_train, y_train = reuse.x_train, reuse.y_train
    else:
        say(f"collecting {n} training contexts")
        x_train, y_train = _collect(adapter, train, layer, input_site, output_site, batch_contexts, progress)
    planted_ctx = train[order[:n_max]].clone()
    planted_ctx[:, 1:1 + len(ids)] = torch.tensor(ids, dtype=planted_ctx.dtype)
    if n_max:
        say(f"collecting {n_max} planted training contexts")
        x_pl, y_pl = _collect(adapter, planted_ctx, layer, input_site, output_site, batch_contexts)
    else:
        x_pl = y_pl = x_train[:0]

    ev = held_out[:eval_contexts]
    if ev.shape[0] == 0:
        raise InputError("no held-out contexts for the experiment")
    if reuse is not None and torch.equal(reuse.eval_contexts, ev):
        x_ev, y_ev = reuse.x_eval, reuse.y_eval
    else:
        say(f"collecting {ev.shape[0]} held-out contexts")
        x_ev, y_ev = _collect(adapter, ev, layer, input_site, output_site, batch_contexts)
    n_pe = max(1, min(passage_eval_contexts, held_out.shape[0]))
    pctx, _ = plant_repeats(held_out[:n_pe], ids, 1.0)
    xp, yp = _collect(adapter, pctx[:1], layer, input_site, output_site, batch_contexts)
    det = held_out[:detector_contexts]
    det_ctx, planted = plant_repeats(det, ids, detector_rate, seed=plant_seed)
    say(f"collecting the detector sample ({det.shape[0]} contexts, {int(planted.sum())} planted)")
    x_det, _ = _collect(adapter, det_ctx, layer, input_site, output_site, batch_contexts)
    keys = context_keys(det_ctx, key_window)[:, 1:].flatten()
    d = x_train.shape[-1]
    return ExperimentData(
        x_train=x_train, y_train=y_train, plant_order=order, x_planted=x_pl, y_planted=y_pl,
        eval_contexts=ev, x_eval=x_ev.reshape(-1, d), y_eval=y_ev.reshape(-1, d), passage_ids=ids,
        x_passage=xp[0, :len(ids)].clone(), y_passage=yp[0, :len(ids)].clone(), passage_contexts=pctx,
        x_detector=x_det.reshape(-1, d), detector_keys=keys, detector_planted=int(planted.sum()),
        train_source=train_source, eval_source=eval_source, layer=layer)


__all__ = ["ExperimentData", "build_experiment_data"]
