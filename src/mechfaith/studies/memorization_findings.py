"""The memorization study's table and findings: means and SDs over seeds of every cell's metrics,
and plain-language statements of what they show, per site (passage, layer) and arm: whether
dedicated datapoint features formed, how much of the passage's fit the linear part (skip and bias)
and the features carry, the FVE reached, and what Jacobian matching changes (a difference is called
clear beyond twice the seeds' spread and at least the metric's smallest effect worth a word)."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mechfaith.studies.memorization_cells import CellResult
    from mechfaith.studies.memorization_config import ExperimentConfig

# the metrics averaged over seeds in the table ("train_fve": the training FVE at the last step)
TABLE_METRICS = ("memorization", "n_passage_features", "datapoint_flagged", "n_specific_features",
                 "specific_share", "passage_mse_ratio", "skip_passage_mse_ratio", "linear_passage_mse_ratio",
                 "passage_linear_share", "passage_feature_share", "heldout_linear_share", "heldout_feature_share",
                 "passage_jacobian_rel", "jacobian_rel", "fve", "train_fve", "l0", "ce_increase", "kl",
                 "passage_ce_increase")
GROUP = ("passage", "layer", "arm", "rate", "jacobian_coef", "k")

# Smallest difference worth a word, per metric (memorization: 1% of the passage's output).
MIN_EFFECT = {"memorization": 0.01, "specific_share": 0.01, "passage_mse_ratio": 0.05,
              "passage_jacobian_rel": 0.01, "n_specific_features": 1.0}


def _mean_sd(values: list[Any]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _value(cell: CellResult, metric: str) -> Any:
    if metric == "train_fve":
        return cell.train_metrics.get("fve", math.nan)
    return cell.metrics.get(metric, math.nan)


def summarize(cells: list[CellResult]) -> list[dict[str, Any]]:
    """Rows of (passage, layer, arm, rate, jacobian_coef, k) with the mean and SD over seeds of
    every table metric (in the order the cells came, then by rate)."""
    groups: dict[tuple[Any, ...], list[CellResult]] = {}
    for c in cells:
        groups.setdefault(tuple(getattr(c, g) for g in GROUP), []).append(c)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(GROUP, key))
        row["seeds"] = len(members)
        for m in TABLE_METRICS:
            mean, sd = _mean_sd([_value(c, m) for c in members])
            row[m], row[m + "_sd"] = mean, sd
        rows.append(row)
    order = {k: i for i, k in enumerate(dict.fromkeys((r["passage"], r["layer"], r["arm"]) for r in rows))}
    return sorted(rows, key=lambda r: (order[(r["passage"], r["layer"], r["arm"])], r["k"], r["jacobian_coef"],
                                       r["rate"]))


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


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if math.isfinite(x) else "n/a"


def _carrier(row: dict[str, Any]) -> str:
    """Whether the linear skip or the latents carry a coder's fit of the passage."""
    skip, whole = row.get("skip_passage_mse_ratio", math.nan), row["passage_mse_ratio"]
    if not math.isfinite(skip):
        return ""
    who = "almost entirely by the linear skip" if whole >= 0.85 * skip else "mostly by the latents"
    return f"; carried {who} (passage MSE ratio of the skip alone {skip:.3g}, of the whole coder {whole:.3g})"


def formed(base: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether dedicated datapoint features formed in ``row`` compared with its rate-0 ``base``: the
    detector flags one, passage features write clearly more of the passage's output, or features
    that meet the 10x criterion appear and write at least 1% of it."""
    more_specific = (row["n_specific_features"] - base["n_specific_features"] >= 1
                     and row["specific_share"] - base["specific_share"] >= MIN_EFFECT["specific_share"])
    more_memo = _clear(base, row, "memorization") and row["memorization"] > base["memorization"]
    return row["datapoint_flagged"] >= 1 or more_specific or more_memo


def _find(rows: list[dict[str, Any]], like: dict[str, Any], **change: Any) -> dict[str, Any] | None:
    want = {**{g: like[g] for g in GROUP}, **change}
    return next((r for r in rows if all(r[g] == want[g] for g in GROUP)), None)


def _label(row: dict[str, Any], plain: float) -> str:
    k = f" k={row['k']}" if row["k"] else ""
    jm = "plain" if row["jacobian_coef"] == plain and plain == 0 else f"Jacobian coef {row['jacobian_coef']:g}"
    return f"{row['passage']} passage, layer {row['layer']}, {row['arm']}{k}, {jm}"


def _datapoint_sentence(rows: list[dict[str, Any]], base: dict[str, Any], label: str, rates: list[float]) -> str:
    parts, verdicts = [], []
    for r in rates:
        row = _find(rows, base, rate=r)
        if row is None:
            continue
        verdicts.append(formed(base, row))
        parts.append(f"at {100 * r:g}%: {row['n_specific_features']:.3g} features >= 10x more active on the "
                     f"passage than on any held-out token (rate 0: {base['n_specific_features']:.3g}), writing "
                     f"{_pct(row['specific_share'])} of its output; memorization {row['memorization']:.3g}; "
                     f"detector flags {row['datapoint_flagged']:.3g}")
    yes = [r for r, v in zip(rates, verdicts) if v]
    verdict = ("dedicated datapoint features formed at " + ", ".join(f"{100 * r:g}%" for r in yes) if yes
               else "no dedicated datapoint features formed")
    return f"{label}: {verdict} (" + "; ".join(parts) + ")."


def _parts_sentence(row: dict[str, Any], label: str, skip: bool) -> str:
    lin = "skip and bias" if skip else "bias (no skip)"
    return (f"{label}, rate {100 * row['rate']:g}%: the passage is fitted {1 / row['passage_mse_ratio']:.3g}x "
            f"as well as held-out text (MSE ratio {row['passage_mse_ratio']:.3g}); the linear part ({lin}) "
            f"writes {_pct(row['passage_linear_share'])} of the MLP's output on the passage (held out: "
            f"{_pct(row['heldout_linear_share'])}) and alone fits it at MSE ratio "
            f"{row['linear_passage_mse_ratio']:.3g}; the features write {_pct(row['passage_feature_share'])} "
            f"(held out: {_pct(row['heldout_feature_share'])}). FVE reached: {row['fve']:.3g} held out "
            f"({row['train_fve']:.3g} in training), L0 {row['l0']:.3g}.")


def _rate_sentences(a: dict[str, Any], b: dict[str, Any], label: str) -> list[str]:
    lo, hi = a["rate"], b["rate"]
    verdict = "rises clearly" if _clear(a, b, "memorization") and b["memorization"] > a["memorization"] \
        else "falls clearly" if _clear(a, b, "memorization") else "shows no clear change"
    skip = (f" (the linear skip alone: {a['skip_passage_mse_ratio']:.3g} -> {b['skip_passage_mse_ratio']:.3g})"
            if math.isfinite(a.get("skip_passage_mse_ratio", math.nan)) else "")
    out = [f"{label}: memorization by passage features {verdict} from rate {lo:g} to {hi:g} "
           f"({a['memorization']:.3g} ± {a['memorization_sd']:.2g} -> {b['memorization']:.3g} ± "
           f"{b['memorization_sd']:.2g}; passage features {a['n_passage_features']:.3g} -> "
           f"{b['n_passage_features']:.3g}). The fit of the passage shows "
           f"{_change(a, b, 'passage_mse_ratio')}: passage MSE / held-out MSE {a['passage_mse_ratio']:.3g} -> "
           f"{b['passage_mse_ratio']:.3g}{skip}; the passage's Jacobian error shows "
           f"{_change(a, b, 'passage_jacobian_rel')} ({a['passage_jacobian_rel']:.3g} -> "
           f"{b['passage_jacobian_rel']:.3g})."]
    if (_clear(a, b, "passage_mse_ratio") and b["passage_mse_ratio"] < a["passage_mse_ratio"]
            and not (_clear(a, b, "passage_jacobian_rel") and b["passage_jacobian_rel"] < a["passage_jacobian_rel"])):
        out.append(
            f"{label}: the coder fits the passage's outputs better without fitting the MLP's local function "
            f"there any better: memorization of the outputs, not of the mechanism (the toy model's signature "
            f"of unfaithfulness)"
            + ("; no dedicated passage features carry it: it is spread over features that also fire on "
               "ordinary text" if not formed(a, b) else "") + _carrier(b) + ".")
    return out


def _jacobian_sentence(p: dict[str, Any], j: dict[str, Any], label: str, base: dict[str, Any] | None) -> str:
    mem = ("lowers memorization clearly" if _clear(p, j, "memorization") and j["memorization"] < p["memorization"]
           else "raises memorization clearly" if _clear(p, j, "memorization")
           else "does not change memorization clearly")
    fit = ("fits the passage clearly less well" if _clear(p, j, "passage_mse_ratio")
           and j["passage_mse_ratio"] > p["passage_mse_ratio"] else
           "fits the passage clearly better" if _clear(p, j, "passage_mse_ratio") else
           "fits the passage about as well")
    after = ""
    if base is not None:
        before_now = (formed(base, p), formed(base, j))
        after = {(True, False): "removes the dedicated datapoint features; it ",
                 (True, True): "does not remove the dedicated datapoint features; it ",
                 (False, True): "makes dedicated datapoint features form; it ",
                 (False, False): "(no dedicated datapoint features with or without it) "}[before_now]
    return (f"{label}, rate {p['rate']:g}: Jacobian matching (coef {j['jacobian_coef']:g}) {after}{mem} "
            f"({p['memorization']:.3g} -> {j['memorization']:.3g}; 10x features {p['n_specific_features']:.3g} -> "
            f"{j['n_specific_features']:.3g}, writing {_pct(p['specific_share'])} -> {_pct(j['specific_share'])}) "
            f"and {fit} (passage MSE / held-out MSE {p['passage_mse_ratio']:.3g} -> {j['passage_mse_ratio']:.3g}; "
            f"features' share of the passage output {_pct(p['passage_feature_share'])} -> "
            f"{_pct(j['passage_feature_share'])}); held-out Jacobian error {p['jacobian_rel']:.3g} -> "
            f"{j['jacobian_rel']:.3g}, passage Jacobian error {p['passage_jacobian_rel']:.3g} -> "
            f"{j['passage_jacobian_rel']:.3g}; cost: FVE {p['fve']:.3g} -> {j['fve']:.3g}, spliced CE increase "
            f"{p['ce_increase']:.3g} -> {j['ce_increase']:.3g} nats.")


def findings(rows: list[dict[str, Any]], cfg: ExperimentConfig) -> list[str]:
    """Plain-language statements of what the table shows (null results included), per site, arm
    and k: rate effects, datapoint features, the fit's parts and FVE, and Jacobian matching."""
    out: list[str] = []
    plain = min(cfg.jacobian_coefs)
    arms = {(r["passage"], r["layer"], r["arm"], r["k"]): r for r in rows}
    for (passage, layer, arm, k), any_row in arms.items():
        rates = sorted({r["rate"] for r in rows if (r["passage"], r["layer"], r["arm"], r["k"]) == (passage, layer, arm, k)})
        lo, hi = rates[0], rates[-1]
        planted = [r for r in rates if r > lo]
        for coef in cfg.jacobian_coefs:
            a = _find(rows, any_row, rate=lo, jacobian_coef=coef)
            b = _find(rows, any_row, rate=hi, jacobian_coef=coef)
            if a is None or b is None or lo == hi:
                continue
            label = _label(a, plain)
            out += _rate_sentences(a, b, label)
            out.append(_datapoint_sentence(rows, a, label, planted))
            out.append(_parts_sentence(b, label, arm.endswith("-skip")))
        for coef in (c for c in cfg.jacobian_coefs if c != plain):
            p = _find(rows, any_row, rate=hi, jacobian_coef=plain)
            j = _find(rows, any_row, rate=hi, jacobian_coef=coef)
            if p is not None and j is not None:
                base = _find(rows, any_row, rate=lo, jacobian_coef=plain) if lo != hi else None
                out.append(_jacobian_sentence(p, j, _label(p, plain).rsplit(", ", 1)[0], base))
    return out


__all__ = ["GROUP", "MIN_EFFECT", "TABLE_METRICS", "findings", "formed", "summarize"]
