"""Figures of the toy report, each written atomically as a PNG (matplotlib is imported when one is drawn)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from mechfaith.coders import SparseCoder
from mechfaith.faithfulness.circuit_library import Decomposition
from mechfaith.reports.figures import pyplot, save_figure


def circuit_map_figure(dec: Decomposition, title: str, path: str | os.PathLike[str]) -> None:
    """Heatmap: x = live learned features (ordered so the diagonal shows), y = library + residual."""
    plt = pyplot()
    order = [i for i in dec.order() if bool(dec.alive[i])]
    share = dec.share[:, order].numpy() if order else np.zeros((len(dec.names), 1))
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(order) + 2.5), 0.28 * len(dec.names) + 1.8))
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(dec.names)), dec.names, fontsize=7)
    ax.set_xticks(range(len(order)), [str(i) for i in order], fontsize=6, rotation=90)
    ax.axhline(len(dec.names) - 1.5, color="white", lw=1)
    ax.set_xlabel("learned feature (index), ordered by best-matching circuit")
    ax.set_ylabel("ideal circuit")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, label="share of the feature's contribution")
    save_figure(fig, path)


def jacobian_figure(jacobians: dict[str, torch.Tensor], n_show: int, path: str | os.PathLike[str]) -> None:
    """One panel per setting: the coder's Jacobian at p (first ``n_show`` dims)."""
    plt = pyplot()
    names = list(jacobians)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    vmax = max(1.0, max(float(j[:n_show, :n_show].abs().max()) for j in jacobians.values()))
    for ax, name in zip(axes[0], names):
        j = jacobians[name][:n_show, :n_show].numpy()
        im = ax.imshow(j, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(name.replace("_", "\n"), fontsize=8)
        ax.set_xticks(range(n_show), [f"x{i + 1}" for i in range(n_show)], fontsize=6)
        ax.set_yticks(range(n_show), [f"y{i + 1}" for i in range(n_show)], fontsize=6)
        for (r, c), val in np.ndenumerate(j):
            if abs(val) > 0.05:
                ax.text(c, r, f"{val:.1f}", ha="center", va="center", fontsize=5)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    fig.suptitle("Jacobian dy/dx at p = [1,1,1,0,...]", fontsize=10)
    save_figure(fig, path)


def feature_weights_figure(coder: SparseCoder, features: Sequence[int], title: str,
                           path: str | os.PathLike[str]) -> None:
    """Encoder column, bias and decoder row of the selected features (one row of panels each)."""
    plt = pyplot()
    features = list(features)[:8] or [0]
    d_in, d_out = coder.d_in, coder.d_out
    fig, axes = plt.subplots(len(features), 2, figsize=(7, 1.1 * len(features) + 0.8), squeeze=False)
    for r, i in enumerate(features):
        enc = coder.W_enc[:, i].detach().numpy()
        dec = coder.W_dec[i].detach().numpy()
        axes[r, 0].bar(range(d_in), enc, color=["C3" if v < 0 else "C0" for v in enc])
        axes[r, 0].set_ylabel(f"f{i}\nb={float(coder.b_enc[i].detach()):.2f}", fontsize=7)
        axes[r, 1].bar(range(d_out), dec, color=["C3" if v < 0 else "C2" for v in dec])
        for ax in axes[r]:
            ax.axhline(0, color="k", lw=0.5)
            ax.tick_params(labelsize=6)
    axes[0, 0].set_title("encoder W_enc[:, i] (reads x)", fontsize=8)
    axes[0, 1].set_title("decoder W_dec[i] (writes y)", fontsize=8)
    fig.suptitle(title, fontsize=10, y=1.0 + 0.35 / (1.1 * len(features) + 0.8))
    save_figure(fig, path)


def scan_figure(repeat_fracs: Sequence[float], coefs: Sequence[float], memorization: np.ndarray,
                path: str | os.PathLike[str]) -> None:
    """Memorization over repeat_frac x lambda (log axes) with repeat_frac * lambda = const lines."""
    plt = pyplot()
    rf, lam = np.asarray(repeat_frac := list(repeat_fracs), float), np.asarray(list(coefs), float)
    mem = np.asarray(memorization, float)
    lx, ly = np.log10(lam), np.log10(rf)

    def edges(v: np.ndarray) -> np.ndarray:
        if len(v) == 1:
            return np.array([v[0] - 0.5, v[0] + 0.5])
        mid = (v[1:] + v[:-1]) / 2
        return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])

    fig, ax = plt.subplots(figsize=(6, 4.5))
    pc = ax.pcolormesh(edges(lx), edges(ly), mem, cmap="magma", vmin=0, shading="flat")
    for (r, c), val in np.ndenumerate(mem):
        ax.text(lx[c], ly[r], f"{val:.2f}", ha="center", va="center", fontsize=7,
                color="white" if val < 0.5 * max(mem.max(), 1e-9) else "black")
    xs = np.linspace(edges(lx)[0], edges(lx)[-1], 50)
    products = np.unique(np.round(np.log10(np.outer(rf, lam)).ravel() * 2) / 2)
    for k in products:
        ax.plot(xs, k - xs, "--", color="cyan", lw=0.8)
        ax.text(xs[-1], k - xs[-1], f"{10 ** k:.0e}", color="cyan", fontsize=6, va="bottom", ha="right",
                clip_on=True)
    ax.set_xlim(edges(lx)[0], edges(lx)[-1])
    ax.set_ylim(edges(ly)[0], edges(ly)[-1])
    ax.set_xticks(lx, [f"{v:g}" for v in lam])
    ax.set_yticks(ly, [f"{v:g}" for v in repeat_frac])
    ax.set_xlabel("sparsity coefficient lambda")
    ax.set_ylabel("repeat_frac")
    ax.set_title("memorization (mean over seeds); dashed: repeat_frac * lambda = const", fontsize=9)
    fig.colorbar(pc, ax=ax, label="memorization sum_i m(f_i, p)")
    save_figure(fig, path)


def masking_figure(coders: dict[str, SparseCoder], x: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Gradient-masking check: per live latent, weight product ||W_enc,i|| ||W_dec,i|| vs bias."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (name, coder) in enumerate(coders.items()):
        with torch.no_grad():
            alive = (coder.forward_full(x).f > 0).any(0)
            wp = (coder.W_enc.norm(dim=0) * coder.W_dec.norm(dim=1))[alive].numpy()
            b = coder.b_enc[alive].numpy()
        ax.scatter(b, wp, s=12, alpha=0.7, label=name, marker="os^vDP*"[k % 7])
    ax.axhline(1, color="gray", lw=0.5, ls=":")
    ax.set_xlabel("encoder bias b_enc,i")
    ax.set_ylabel("||W_enc,i|| ||W_dec,i||")
    ax.set_title("gradient masking would show as large weights with very negative bias (top left)",
                 fontsize=8)
    ax.legend(fontsize=6)
    save_figure(fig, path)
