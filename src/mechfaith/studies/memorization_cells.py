"""The cells of the memorization experiment: their list, names and keys, how one is trained, and
their results (:class:`CellResult`, ``cells/NAME/result.json``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.files import read_json
from mechfaith.coders.init import init_from_data
from mechfaith.configs import config_to_dict
from mechfaith.errors import TrainingDiverged
from mechfaith.jsonio import json_safe
from mechfaith.lm.config import lm_train_config
from mechfaith.studies.memorization_arms import arm_coder_config, arm_penalty, init_thresholds, parse_arm
from mechfaith.studies.memorization_config import BUILTIN_PASSAGES, ExperimentConfig
from mechfaith.studies.memorization_data import ExperimentData
from mechfaith.training.streams import TensorStream
from mechfaith.training.trainer import Trainer

# settings a cell's result does not depend on (its own place in the grid is added separately)
NOT_IN_KEY = ("layers", "passages", "arms", "other_site_arms", "rates", "jacobian_coefs", "jacobian_at", "jacobian_arms",
              "other_site_rates", "other_site_jacobian",
              "ks", "seeds",
              "save_coders", "device", "tanh_coef", "tanh_c", "jumprelu_coef", "jumprelu_init_l0",
              "jumprelu_bandwidth", "jumprelu_threshold_lr")


@dataclass
class CellResult:
    """One cell: its setting, how its training went, and its measurements (``cells/NAME/result.json``).

    ``passage`` is the passage's label (a built-in name or the file's stem), ``layer`` the resolved
    layer, ``arm`` the arm's name (``topk``, ``relu-tanh-skip``, ...), ``k`` the TopK k (0 for a
    penalty arm, whose sparsity is set by its coefficient). ``metrics`` maps each measurement of
    :func:`~mechfaith.studies.memorization_metrics.measure_cell` to its value."""

    name: str
    passage: str
    layer: int
    arm: str
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


def passage_label(spec: str) -> str:
    """A short name of passage ``spec`` for cell names: the built-in name or the file's stem."""
    if spec in BUILTIN_PASSAGES:
        return spec
    return re.sub(r"[^A-Za-z0-9-]+", "-", Path(spec).stem).strip("-") or "passage"


def cell_name(passage: str, layer: int, arm: str, rate: float, coef: float, k: int, seed: int) -> str:
    ktext = f"_k{k}" if k else ""
    return f"{passage}_L{layer}_{arm}_rate{rate:g}_jac{coef:g}{ktext}_seed{seed}"


def site_cells(cfg: ExperimentConfig, passage: str, layer: int, arms: list[str],
               main: bool = True) -> list[dict[str, Any]]:
    """The cells of one site (the main one or another: :meth:`ExperimentConfig.site_plan`): every
    arm x rate x Jacobian coefficient (x k for TopK arms) x seed, Jacobian coefficients > 0 only for
    the site's Jacobian-matching arms at ``cfg.jacobian_rates``."""
    label = passage_label(passage)
    rates, jm_arms = cfg.site_plan(main, arms)
    jm_rates = cfg.jacobian_rates(rates)
    out = []
    for arm_name in arms:
        ks = cfg.ks if parse_arm(arm_name).uses_k else [0]
        out += [{"name": cell_name(label, layer, arm_name, r, c, k, s), "passage": label, "layer": layer,
                 "arm": arm_name, "rate": r, "jacobian_coef": c, "k": k, "seed": s}
                for r in rates for c in cfg.jacobian_coefs for k in ks for s in cfg.seeds
                if c == 0 or (arm_name in jm_arms and r in jm_rates)]
    return out


def cell_key(cfg: ExperimentConfig, cell: dict[str, Any], data: ExperimentData, passage_text: str) -> dict[str, Any]:
    """What a finished cell's result depends on (a rerun reuses it only when this matches): the
    shared settings, the cell's own place, its arm's coefficients, the passage and the data."""
    keep = {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_IN_KEY}
    arm = parse_arm(cell["arm"])
    penalty = arm_penalty(arm, cfg.tanh_coef, cfg.tanh_c, cfg.jumprelu_coef, cfg.jumprelu_threshold_lr)
    if arm.kind == "jumprelu":
        penalty = {**penalty, "init_l0": cfg.jumprelu_init_l0, "bandwidth": cfg.jumprelu_bandwidth}
    return {**keep, **{k: cell[k] for k in ("layer", "arm", "rate", "jacobian_coef", "k", "seed")},
            "penalty": penalty, "passage_text": passage_text, "data": data.summary()}


def finished_cell(path: Path, key: dict[str, Any]) -> CellResult | None:
    """The result of a cell finished earlier with the same settings, or None (missing, damaged,
    written by other settings)."""
    if not path.is_file():
        return None
    try:
        old = read_json(path)
        return CellResult.from_json(old) if isinstance(old, dict) and old.get("key") == key else None
    except Exception:  # noqa: BLE001 - a damaged result is recomputed
        return None


def train_cell(data: ExperimentData, reference: Callable, cfg: ExperimentConfig, cell: dict[str, Any],
               progress: bool = False) -> tuple[SparseCoder, dict[str, Any]]:
    """Train the transcoder of one cell (its arm's kind) on the training rows planted at its rate."""
    x, y = data.training_rows(cell["rate"])
    arm = parse_arm(cell["arm"])
    ccfg = arm_coder_config(arm, x.shape[1], y.shape[1], cfg.n_latents, cell["k"],
                            jumprelu_bandwidth=cfg.jumprelu_bandwidth)
    coder = SparseCoder(ccfg, generator=torch.Generator().manual_seed(cell["seed"]))
    gen = torch.Generator().manual_seed(cell["seed"])
    init_rows = torch.randperm(x.shape[0], generator=gen)[:65536]
    init_from_data(coder, x[init_rows], y[init_rows], skip_init="lstsq", latent_init_fraction=0.3,
                   center_encoder=True)
    if arm.kind == "jumprelu":
        init_thresholds(coder, x[init_rows[:8192]], cfg.jumprelu_init_l0)
    penalty = arm_penalty(arm, cfg.tanh_coef, cfg.tanh_c, cfg.jumprelu_coef, cfg.jumprelu_threshold_lr)
    tcfg = lm_train_config(n_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cell["seed"],
                           jacobian_coef=cell["jacobian_coef"], n_probes=cfg.n_probes,
                           log_every=max(cfg.steps, 1), checkpoint_every=0, device=cfg.device,
                           lr_warmup_steps=min(20, max(cfg.steps // 5, 1)),
                           sparsity_warmup_steps=0 if arm.uses_k else max(cfg.steps // 10, 1), **penalty)
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


__all__ = ["CellResult", "NOT_IN_KEY", "cell_key", "cell_name", "finished_cell", "passage_label", "site_cells",
           "train_cell"]
