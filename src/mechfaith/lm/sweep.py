"""Pareto sweep: SAEs and transcoders at one layer over several sparsity settings, L0 vs spliced CE.

One activation cache feeds every coder. Transcoders map the MLP input to its output; SAEs
reconstruct the MLP output and replace it with their reconstruction (the comparison of the
transcoder paper's layer-8 figure). All coders are then evaluated in one pass over held-out
contexts that shares the clean, zero-ablated and mean-ablated runs (:func:`evaluate_many`), and
the figure plots each coder's L0 against its spliced CE, with the clean and mean-ablation
(and zero-ablation) CE as horizontal lines. Encoders without an LM head (MiniLM) plot the relative
error of the final hidden states instead.

Outputs in the sweep folder: ``activations/`` (unless given), ``runs/<kind>_<param><value>/`` (one
train run each), ``sweep.json`` and ``sweep.png``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mechfaith.atomic import write_bytes_atomic
from mechfaith.errors import ConfigError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.adapters import get_adapter, hooks_removed_after
from mechfaith.lm.corpus import CorpusConfig
from mechfaith.lm.fidelity import (
    FidelityConfig,
    _StatsAccumulator,
    kl_per_token,
    loss_recovered,
    mean_mlp_outputs,
    next_token_ce,
)
from mechfaith.lm.pipeline import (
    ACTIVATIONS_DIR,
    LMCoderConfig,
    LMConfig,
    collect,
    eval_contexts,
    get_model,
    open_coder,
    resolve_layer,
    train_coder,
)
from mechfaith.lm.splice import ablate, splice
from mechfaith.training.config import TrainConfig

log = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
SWEEP_KINDS = ("transcoder", "sae")


@dataclass
class SpliceEntry:
    """One coder to splice: its layer and sites (input_site 'mlp_out' for an SAE of the output)."""

    coder: Any
    layer: int
    input_site: str
    output_site: str = "mlp_out"


def evaluate_many(model: Any, contexts: Tensor, entries: Mapping[str, SpliceEntry],
                  cfg: FidelityConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """Fidelity of each coder spliced alone, sharing the clean and ablated runs between them.

    Returns ``{"baseline": {...}, "coders": {name: {...}}}``: for a causal LM the CE of the clean
    model and of zero / mean ablation of each layer, and per coder ``ce_spliced``, ``kl_spliced``,
    ``loss_recovered_zero`` / ``_mean``, ``fve``, ``l0``; for an encoder the relative error of the
    final hidden states (``hidden_rel_error_spliced``; baseline ``hidden_rel_error_zero_ablated``).
    """
    cfg = cfg or FidelityConfig()
    adapter = get_adapter(model)
    if not entries:
        raise ConfigError("evaluate_many needs at least one coder")
    if cfg.max_contexts:
        contexts = contexts[: cfg.max_contexts]
    layers = sorted({adapter.check_layer(int(e.layer)) for e in entries.values()})
    lm = adapter.has_lm_head and adapter.family.causal
    device = next(adapter.model.parameters()).device
    start = 1 if cfg.exclude_bos else 0
    means = mean_mlp_outputs(adapter, contexts, layers, cfg.batch_contexts, exclude_bos=True) if lm else None
    acc = {name: _StatsAccumulator(e.coder, start) for name, e in entries.items()}
    sums: dict[str, float] = {}
    n_pred = 0

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value.double().sum())

    sites = {(e.layer, s) for e in entries.values() for s in (e.input_site, e.output_site)}
    bar = tqdm(total=contexts.shape[0], unit="ctx", desc="sweep eval", disable=not progress, leave=False)
    with torch.inference_mode():
        for i in range(0, contexts.shape[0], cfg.batch_contexts):
            ids = contexts[i:i + cfg.batch_contexts].to(device)
            captured: dict[Any, Tensor] = {}
            with hooks_removed_after() as handles:
                for key in sites:
                    handles.extend(adapter.hook_site(key[0], key[1],
                                                     lambda t, k=key: captured.__setitem__(k, t)))
                if not lm:
                    handles.extend(adapter.hook_site(adapter.n_layers - 1, "resid_post",
                                                     lambda t: captured.__setitem__("final", t)))
                clean_logits = adapter.logits(ids) if lm else None
                if not lm:
                    adapter.forward(ids)
            for name, e in entries.items():
                acc[name].add(captured[(e.layer, e.input_site)], captured[(e.layer, e.output_site)])
            variants: list[tuple[str, Any]] = []
            for layer in layers:
                variants.append((f"zero_ablated/{layer}", lambda l=layer: ablate(adapter, [l], "zero")))
                if lm:
                    variants.append((f"mean_ablated/{layer}", lambda l=layer: ablate(adapter, [l], "mean", means)))
            for name, e in entries.items():
                variants.append((f"spliced/{name}", lambda e=e: splice(adapter, {e.layer: e.coder}, e.input_site,
                                                                       e.output_site, keep_bos=cfg.keep_bos)))
            if lm:
                assert clean_logits is not None
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
    baseline: dict[str, Any] = {"n_tokens": int(contexts.numel()), "layers": layers}
    coders: dict[str, dict[str, Any]] = {}
    for name, e in entries.items():
        st = acc[name].result(e.layer, cfg)
        coders[name] = {"layer": e.layer, "input_site": e.input_site, "output_site": e.output_site,
                        "fve": st.fve, "mse": st.mse, "l0": st.l0, "l0_bos": st.l0_bos,
                        "dead_fraction": st.dead_fraction, "dense_fraction": st.dense_fraction}
    if lm:
        ce_clean = sums["ce_clean"] / n_pred
        baseline["ce_clean"] = ce_clean
        for layer in layers:
            for abl in ("zero_ablated", "mean_ablated"):
                baseline[f"ce_{abl}"] = baseline.get(f"ce_{abl}", {})
                baseline[f"ce_{abl}"][str(layer)] = sums[f"ce/{abl}/{layer}"] / n_pred
                baseline[f"kl_{abl}"] = baseline.get(f"kl_{abl}", {})
                baseline[f"kl_{abl}"][str(layer)] = sums[f"kl/{abl}/{layer}"] / n_pred
        for name, e in entries.items():
            ce = sums[f"ce/spliced/{name}"] / n_pred
            c = coders[name]
            c["ce_spliced"] = ce
            c["ce_increase"] = ce - ce_clean
            c["kl_spliced"] = sums[f"kl/spliced/{name}"] / n_pred
            c["loss_recovered_zero"] = loss_recovered(ce_clean, ce, baseline["ce_zero_ablated"][str(e.layer)])
            c["loss_recovered_mean"] = loss_recovered(ce_clean, ce, baseline["ce_mean_ablated"][str(e.layer)])
    else:
        hn = sums["hidden_norm"]
        baseline["hidden_rel_error_zero_ablated"] = {
            str(l): math.sqrt(sums[f"err/zero_ablated/{l}"] / hn) for l in layers}
        for name in entries:
            coders[name]["hidden_rel_error_spliced"] = math.sqrt(sums[f"err/spliced/{name}"] / hn)
    return {"baseline": baseline, "coders": coders}


# ---------------------------------------------------------------------- the sweep
def sweep_param(activation: str) -> str:
    """The sparsity knob of an activation: ``k`` for topk / batchtopk, ``sparsity_coef`` otherwise."""
    return "k" if activation in ("topk", "batchtopk") else "sparsity_coef"


def _value_label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def run_sweep(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
              values: Sequence[float], out: str | Path, *, kinds: Sequence[str] = SWEEP_KINDS,
              activations: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one coder per (kind, value) at ``cfg.layer``, evaluate them together, write
    ``sweep.json`` and ``sweep.png`` into ``out``; returns the JSON's content."""
    out = Path(out)
    if not values:
        raise ConfigError("the sweep needs at least one sparsity value")
    unknown = [k for k in kinds if k not in SWEEP_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"sweep kinds must be among {', '.join(SWEEP_KINDS)}, got {list(kinds)}")
    param = sweep_param(coder_cfg.activation)
    if param == "k" and any(v <= 0 or not float(v).is_integer() for v in values):
        raise ConfigError(f"TopK sweep values are k (positive integers), got {list(values)}")
    if param == "sparsity_coef" and any(v < 0 for v in values):
        raise ConfigError(f"sparsity coefficients must be >= 0, got {list(values)}")
    t0 = time.perf_counter()
    lm = get_model(cfg)
    layer = resolve_layer(lm.adapter, cfg.layer)
    cfg = dataclasses.replace(cfg, layer=layer)
    if activations is None:
        activations = out / ACTIVATIONS_DIR
        collect(cfg, corpus_cfg, activations, layers=[layer], progress=progress)
    runs: list[dict[str, Any]] = []
    entries: dict[str, SpliceEntry] = {}
    for kind in kinds:
        for value in values:
            name = f"{kind}_{param}{_value_label(value)}"
            ccfg = dataclasses.replace(coder_cfg, kind=kind)
            tcfg = train_cfg
            if param == "k":
                ccfg = dataclasses.replace(ccfg, k=int(value))
            else:
                tcfg = dataclasses.replace(train_cfg, sparsity_coef=float(value))
            log.info("sweep: training %s", name)
            summary = train_coder(cfg, corpus_cfg, ccfg, tcfg, out / "runs" / name, activations=activations,
                                  sae_site="output", progress=progress)
            ref = open_coder(out / "runs" / name)
            entries[name] = SpliceEntry(ref.coder.to(cfg.device), layer, str(ref.input_site), str(ref.output_site))
            runs.append({"name": name, "kind": kind, "param": param, "value": value,
                         "train_seconds": summary["train_seconds"],
                         "final_train_metrics": summary["final_train_metrics"]})
    contexts, source = eval_contexts(lm, corpus_cfg, cfg.eval_contexts)
    fcfg = FidelityConfig(batch_contexts=cfg.batch_contexts, exclude_bos=cfg.exclude_bos)
    t_eval = time.perf_counter()
    ev = evaluate_many(lm.adapter, contexts, entries, fcfg, progress=progress)
    eval_seconds = time.perf_counter() - t_eval
    for r in runs:
        r.update(ev["coders"][r["name"]])
    result = {"command": "sweep", "model": lm.name, "family": lm.adapter.family.name, "layer": layer,
              "param": param, "values": list(values), "kinds": list(kinds), "eval_source": source,
              "eval_contexts": int(contexts.shape[0]), "baseline": ev["baseline"], "runs": runs,
              "eval_seconds": round(eval_seconds, 2), "total_seconds": round(time.perf_counter() - t0, 2),
              "figure": str(out / SWEEP_PNG)}
    plot_sweep(result, out / SWEEP_PNG)
    write_json(out / SWEEP_JSON, json_safe(result))
    return result


def plot_sweep(result: Mapping[str, Any], path: str | Path) -> None:
    """L0 (x) against spliced CE (y), one line per kind, with clean / ablation lines; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["baseline"]
    layer = str(result["layer"])
    lm = "ce_clean" in base
    key = "ce_spliced" if lm else "hidden_rel_error_spliced"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"transcoder": ("tab:blue", "o"), "sae": ("tab:orange", "s")}
    for kind in result["kinds"]:
        pts = sorted((r["l0"], r[key], r["value"]) for r in result["runs"]
                     if r["kind"] == kind and r.get("l0") is not None and r.get(key) is not None)
        if not pts:
            continue
        color, marker = styles.get(kind, ("tab:green", "^"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                label=f"{kind}s" if kind != "sae" else "SAEs (MLP output)")
        for l0, y, v in pts:
            ax.annotate(f"{result['param']}={_value_label(v)}", (l0, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)
    if lm:
        ax.axhline(base["ce_clean"], color="black", ls="--", lw=1, label=f"clean ({base['ce_clean']:.3f})")
        mean = base["ce_mean_ablated"][layer]
        ax.axhline(mean, color="tab:red", ls=":", lw=1.2, label=f"mean-ablated MLP ({mean:.3f})")
        zero = base["ce_zero_ablated"][layer]
        ax.axhline(zero, color="tab:gray", ls=":", lw=1, label=f"zero-ablated MLP ({zero:.3f})")
        ax.set_ylabel("next-token CE with the coder spliced in (nats)")
    else:
        ax.axhline(0.0, color="black", ls="--", lw=1, label="clean (0)")
        zero = base["hidden_rel_error_zero_ablated"][layer]
        ax.axhline(zero, color="tab:gray", ls=":", lw=1, label=f"zero-ablated MLP ({zero:.3f})")
        ax.set_ylabel("relative error of the final hidden states")
    ax.set_xlabel("L0 (active latents per token, BOS excluded)")
    ax.set_title(f"{result['model']}, layer {layer} MLP: sparsity vs fidelity", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
