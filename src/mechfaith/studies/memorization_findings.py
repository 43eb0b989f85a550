"""The memorization study's table and findings: means and SDs over seeds of every cell's metrics,
and plain-language statements of what they show (a difference is called clear beyond twice the
seeds' spread and at least the metric's smallest effect worth a word)."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mechfaith.studies.memorization import CellResult, ExperimentConfig

# the metrics averaged over seeds in the table
TABLE_METRICS = ("memorization", "n_passage_features", "datapoint_flagged", "passage_mse_ratio",
                 "skip_passage_mse_ratio",
                 "passage_jacobian_rel", "jacobian_rel", "fve", "l0", "ce_increase", "kl",
                 "passage_ce_increase")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(cells: list[CellResult]) -> list[dict[str, Any]]:
    """Rows of (rate, jacobian_coef, k) with the mean and SD over seeds of every table metric."""
    groups: dict[tuple[float, float, int], list[CellResult]] = {}
    for c in cells:
        groups.setdefault((c.rate, c.jacobian_coef, c.k), []).append(c)
    rows = []
    for (rate, coef, k), members in sorted(groups.items()):
        row: dict[str, Any] = {"rate": rate, "jacobian_coef": coef, "k": k, "seeds": len(members)}
        for m in TABLE_METRICS:
            mean, sd = _mean_sd([c.metrics[m] for c in members])
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
