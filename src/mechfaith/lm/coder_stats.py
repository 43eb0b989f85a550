"""Statistics of a coder on a layer's clean (input, output) activations: FVE
``1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2``, MSE, L0 (BOS separately), dead and dense
latent fractions and a histogram of log10 feature densities (used by :mod:`mechfaith.lm.fidelity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.lm.splice import Coder


@dataclass
class LayerStats:
    """Statistics of one layer's coder on clean inputs."""

    layer: int
    fve: float
    mse: float
    l0: float | None = None
    l0_bos: float | None = None
    dead_fraction: float | None = None
    dense_fraction: float | None = None
    density_histogram: dict[str, list[float] | int] | None = None  # {"edges": log10 edges, "counts": ...}


class StatsAccumulator:
    """Sums for FVE, L0 and latent densities of one layer's coder on clean inputs."""

    def __init__(self, coder: Coder, start: int) -> None:
        self.coder = coder
        self.start = start
        self.sse = 0.0
        self.n = 0
        self.y_sum: Tensor | None = None
        self.y_sq = 0.0
        self.fire: Tensor | None = None
        self.l0_sum = 0.0
        self.l0_bos_sum = 0.0
        self.n_bos = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        # x [batch, seq, d_in], y [batch, seq, d_out]
        body_x = x[:, self.start:].reshape(-1, x.shape[-1])
        body_y = y[:, self.start:].reshape(-1, y.shape[-1]).double()
        if isinstance(self.coder, SparseCoder):
            out = self.coder.forward_full(body_x.to(self.coder.W_enc.dtype))
            y_hat = out.y_hat.double()
            active = out.f != 0
            self.fire = active.sum(0).double() + (self.fire if self.fire is not None else 0)
            self.l0_sum += float(active.sum())
            if self.start == 1:
                f_bos = self.coder.forward_full(x[:, 0].to(self.coder.W_enc.dtype)).f
                self.l0_bos_sum += float((f_bos != 0).sum())
                self.n_bos += x.shape[0]
        else:
            y_hat = self.coder(body_x).double()
        self.sse += float((body_y - y_hat).pow(2).sum())
        self.y_sum = body_y.sum(0) + (self.y_sum if self.y_sum is not None else 0)
        self.y_sq += float(body_y.pow(2).sum())
        self.n += body_y.shape[0]

    def result(self, layer: int, dense_threshold: float = 0.1, histogram_bins: int = 28) -> LayerStats:
        assert self.y_sum is not None
        total_var = self.y_sq - float(self.y_sum.pow(2).sum()) / self.n
        stats = LayerStats(layer=layer, fve=1.0 - self.sse / total_var if total_var > 0 else float("nan"),
                           mse=self.sse / self.n)
        if self.fire is not None:
            density = self.fire / self.n
            stats.l0 = self.l0_sum / self.n
            stats.l0_bos = self.l0_bos_sum / self.n_bos if self.n_bos else None
            stats.dead_fraction = float((density == 0).double().mean())
            stats.dense_fraction = float((density > dense_threshold).double().mean())
            alive = density[density > 0]
            edges = torch.linspace(-7.0, 0.0, histogram_bins + 1, dtype=torch.float64)
            counts = torch.histc(alive.log10().clamp(-7.0, 0.0), bins=histogram_bins, min=-7.0, max=0.0)
            stats.density_histogram = {"edges": edges.tolist(), "counts": counts.tolist(),
                                       "dead": int((density == 0).sum())}
        return stats
