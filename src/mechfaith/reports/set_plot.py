"""The figure of a set's all-layer evaluation (``SET/eval.png`` of ``mechfaith lm eval SET``): per
layer the coders' FVE and L0, and the CE of the cumulative splice (layers up to l replaced) against
l, with the clean CE, each layer alone, and all MLPs zero-ablated as references."""

from __future__ import annotations

from pathlib import Path

from mechfaith.lm.set_eval import SetEvalResult
from mechfaith.reports.figures import pyplot, save_figure


def plot_set_eval(result: SetEvalResult, path: str | Path) -> None:
    """Two panels (FVE and L0 per layer; CE of the cumulative splice per layer); PNG, written atomically."""
    plt = pyplot()
    layers = [p.layer for p in result.per_layer]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 6.4), sharex=True)
    fve = [p.fve for p in result.per_layer]
    top.plot(layers, [max(v, -1.0) for v in fve], "o-", color="tab:blue", ms=3, label="FVE")
    for layer, v in zip(layers, fve):
        if v < -1.0:  # one bad layer must not flatten the others: clip at -1 and say so
            top.annotate(f"{v:.3g}", (layer, -1.0), textcoords="offset points", xytext=(3, 3), fontsize=7,
                         color="tab:blue")
    top.set_ylim(min(-0.05, min(max(v, -1.0) for v in fve) - 0.05), 1.05)
    top.set_ylabel("FVE (held-out, BOS excluded;\nclipped at -1)", color="tab:blue")
    top.grid(alpha=0.3)
    l0 = top.twinx()
    l0.plot(layers, [p.l0 if p.l0 is not None else float("nan") for p in result.per_layer], "s--",
            color="tab:orange", ms=3, label="L0")
    l0.set_ylabel("L0 (active latents per token)", color="tab:orange")
    l0s = [p.l0 for p in result.per_layer if p.l0 is not None]
    if l0s:  # from 0, without an offset: TopK's L0 is k up to float rounding, not a curve to zoom into
        l0.set_ylim(0, max(l0s) * 1.15 + 1e-9)
        l0.ticklabel_format(axis="y", useOffset=False)
    top.set_title(f"{result.model}: a coder at {len(layers)} layers", fontsize=10)
    nan = float("nan")
    bottom.plot(layers, [p.ce_prefix if p.ce_prefix is not None else nan for p in result.per_layer], "o-",
                color="tab:purple", ms=3, label="layers up to l replaced")
    bottom.plot(layers, [p.ce_alone if p.ce_alone is not None else nan for p in result.per_layer], "x:",
                color="tab:green", ms=4, label="layer l alone")
    bottom.axhline(result.ce_clean, color="black", ls="--", lw=1, label=f"clean ({result.ce_clean:.3f})")
    bottom.axhline(result.ce_zero_ablated, color="tab:gray", ls=":", lw=1,
                   label=f"all MLPs zero-ablated ({result.ce_zero_ablated:.3f})")
    bottom.set_ylim(result.ce_clean - 0.05 * abs(result.ce_all - result.ce_clean) - 1e-3,
                    max(result.ce_all, *(p.ce_alone or result.ce_clean for p in result.per_layer))
                    + 0.15 * abs(result.ce_all - result.ce_clean) + 1e-3)
    bottom.set_xlabel("layer l")
    bottom.set_ylabel("next-token CE (nats)")
    bottom.legend(fontsize=7)
    bottom.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
