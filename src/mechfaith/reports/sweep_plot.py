"""The sweep's figure (``sweep.png`` of ``mechfaith lm sweep``): each coder's L0 against its
spliced CE (or, for an encoder, the relative error of the final hidden states), one line per kind,
with the clean and ablation levels as horizontal lines. matplotlib is imported only when drawing.
"""

from __future__ import annotations

from pathlib import Path

from mechfaith.lm.sweep import SweepResult, value_label
from mechfaith.reports.figures import pyplot, save_figure


def plot_sweep(result: SweepResult, path: str | Path) -> None:
    """L0 (x) against spliced CE (y), one line per kind, with clean / ablation lines; PNG, atomic."""
    plt = pyplot()
    base = result.baseline
    layer = str(result.layer)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"transcoder": ("tab:blue", "o"), "sae": ("tab:orange", "s")}
    for kind in result.kinds:
        pts = sorted((r.l0, r.spliced, r.value) for r in result.runs
                     if r.kind == kind and r.l0 is not None and r.spliced is not None)
        if not pts:
            continue
        color, marker = styles.get(kind, ("tab:green", "^"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                label=f"{kind}s" if kind != "sae" else "SAEs (MLP output)")
        for l0, y, v in pts:
            ax.annotate(f"{result.param}={value_label(v)}", (l0, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=color)
    if base.ce_clean is not None and base.ce_mean_ablated is not None and base.ce_zero_ablated is not None:
        ax.axhline(base.ce_clean, color="black", ls="--", lw=1, label=f"clean ({base.ce_clean:.3f})")
        mean = base.ce_mean_ablated[layer]
        ax.axhline(mean, color="tab:red", ls=":", lw=1.2, label=f"mean-ablated MLP ({mean:.3f})")
        zero = base.ce_zero_ablated[layer]
        ax.axhline(zero, color="tab:gray", ls=":", lw=1, label=f"zero-ablated MLP ({zero:.3f})")
        ax.set_ylabel("next-token CE with the coder spliced in (nats)")
    else:
        ax.axhline(0.0, color="black", ls="--", lw=1, label="clean (0)")
        zero = (base.hidden_rel_error_zero_ablated or {})[layer]
        ax.axhline(zero, color="tab:gray", ls=":", lw=1, label=f"zero-ablated MLP ({zero:.3f})")
        ax.set_ylabel("relative error of the final hidden states")
    ax.set_xlabel("L0 (active latents per token, BOS excluded)")
    ax.set_title(f"{result.model}, layer {layer} MLP: sparsity vs fidelity", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
