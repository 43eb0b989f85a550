"""The attribution-graph case study as a Markdown summary (``mechfaith graph --case-study``)."""

from __future__ import annotations

from typing import Any


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def case_study_markdown(rows: list[dict[str, Any]]) -> str:
    """One table of scores and checks over the prompts, then each prompt's top features."""
    out = ["# Attribution-graph case study", "",
           "| prompt | tokens | top logits | active features | feature nodes | kept nodes / links | graph s "
           "| replacement | completeness | feature share | Spearman frozen / frozen nonlinear / live linear / live "
           "| median rel. error (same worlds) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("check") or {}
        sp, me = c.get("spearman", {}), c.get("median_rel_error", {})
        worlds = ("frozen", "frozen_nonlinear", "live_linear", "live")
        logits = ", ".join(f"{x['token']!r} {x['p']:.2f}" for x in r["logits"])
        out.append(f"| {r['name']} | {r['n_tokens']} | {logits} | {r['n_active']} | {r['feature_nodes']} "
                   f"| {r['kept_nodes']} / {r['kept_links']} | {r['seconds']:.1f} | {_f(r['replacement_score'])} "
                   f"| {_f(r['completeness_score'])} | {_f(r['feature_share'])} "
                   f"| {' / '.join(_f(sp.get(w)) for w in worlds)} | {' / '.join(_f(me.get(w)) for w in worlds)} |")
    for r in rows:
        out += ["", f"## {r['name']}: {r['prompt']!r} -> {r['logits'][0]['token']!r}", "",
                "| feature | token | activation | influence | top de-embedding tokens |", "|---|---|---|---|---|"]
        for t in r["top_features"]:
            de = ", ".join(repr(x) for x in t["de_embedding"])
            out.append(f"| {t['node']} | {t['token']!r} | {t['activation']:.3g} | {t['influence']:.4f} | {de} |")
    return "\n".join(out) + "\n"
