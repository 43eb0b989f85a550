"""The ground truth of the multi-hop toy: a residual network whose MLPs compute chained ANDs.

Features. ``n_chains`` independent chains k; each has ``n_layers + 1`` boolean inputs
``a[k, 0..L]`` and ``n_layers`` intermediate features ``h[k, 1..L]``::

    h[k, 1]     = AND(a[k, 0], a[k, 1])        computed by MLP_0
    h[k, l + 1] = AND(h[k, l], a[k, l + 1])    computed by MLP_l, l = 1 .. L - 1

so ``h[k, l]`` is the AND of ``a[k, 0..l]``, computed in ``l`` hops, each hop reading the previous
hop's output from the residual stream. With two layers and one chain, in the names of the README:
``a_p, a_q, a_r = a[0, 0], a[0, 1], a[0, 2]``, ``b = h[0, 1]`` (layer 0), ``c = h[0, 2]`` (layer 1).

Residual stream. Every feature j has its own direction ``E[j]`` (rows of ``E`` [n_features,
d_model] are orthonormal: the first n_features columns of a random orthogonal matrix with
``embed_seed``, or the standard basis when ``embed_seed`` is None). The input at layer 0 is
``x_0 = sum_j a_j E[a_j]``; the residual is ``x_{l+1} = x_l + MLP_l(x_l)``.

MLP_l (a real :class:`torch.nn.Module` with ReLU, one hidden neuron per chain)::

    hidden_k = ReLU( x . (E[u_k] + E[v_k]) - 1.5 )       u, v: the two operands of hop l of chain k
    MLP_l(x) = sum_k 2 hidden_k E[h[k, l + 1]]

On {0, 1} operands the pre-activation is -1.5, -0.5 or 0.5, so ``2 ReLU(u + v - 1.5) = AND(u, v)``
exactly, and no pre-activation sits at ReLU's kink: the MLP's Jacobian on the data is unambiguous
(``2 (E[u] + E[v])^T E[h]`` per chain whose operands are both 1, zero otherwise) and does not
depend on a convention for ReLU'(0) or on rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mechfaith.errors import ConfigError

AND_BIAS = -1.5
AND_SCALE = 2.0


@dataclass(frozen=True)
class ChainLayout:
    """Feature names and indices of the chains: inputs first (chain-major), then intermediates."""

    n_chains: int
    n_layers: int

    def __post_init__(self) -> None:
        if self.n_chains < 1 or self.n_layers < 1:
            raise ConfigError(f"multihop: n_chains and n_layers must be >= 1, got {self.n_chains}, {self.n_layers}")

    @property
    def n_inputs(self) -> int:
        return self.n_chains * (self.n_layers + 1)

    @property
    def n_features(self) -> int:
        return self.n_inputs + self.n_chains * self.n_layers

    def a(self, k: int, j: int) -> int:
        """Index of input ``a[k, j]`` (j = 0 .. n_layers)."""
        return k * (self.n_layers + 1) + j

    def h(self, k: int, l: int) -> int:
        """Index of intermediate ``h[k, l]`` (l = 1 .. n_layers), written by MLP_{l-1}."""
        return self.n_inputs + k * self.n_layers + (l - 1)

    def operands(self, k: int, layer: int) -> tuple[int, int]:
        """The two features MLP_layer ANDs for chain k."""
        return (self.a(k, 0), self.a(k, 1)) if layer == 0 else (self.h(k, layer), self.a(k, layer + 1))

    def names(self) -> list[str]:
        out = [f"a{k}.{j}" for k in range(self.n_chains) for j in range(self.n_layers + 1)]
        return out + [f"h{k}.{l}" for k in range(self.n_chains) for l in range(1, self.n_layers + 1)]


def embedding(n_features: int, d_model: int, seed: int | None) -> Tensor:
    """Orthonormal feature directions [n_features, d_model] (see the module docstring)."""
    if d_model < n_features:
        raise ConfigError(f"multihop: d_model = {d_model} is below the {n_features} features")
    if seed is None:
        return torch.eye(n_features, d_model)
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d_model, d_model, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q[:, :n_features].T.contiguous().float()


class AndMLP(nn.Module):
    """MLP_layer of the ground truth (module docstring): ``[..., d_model] -> [..., d_model]``."""

    def __init__(self, layout: ChainLayout, E: Tensor, layer: int) -> None:
        super().__init__()
        K = layout.n_chains
        W_in = torch.zeros(E.shape[1], K)
        W_out = torch.zeros(K, E.shape[1])
        for k in range(K):
            u, v = layout.operands(k, layer)
            W_in[:, k] = E[u] + E[v]
            W_out[k] = AND_SCALE * E[layout.h(k, layer + 1)]
        self.W_in = nn.Parameter(W_in, requires_grad=False)
        self.b_in = nn.Parameter(torch.full((K,), AND_BIAS), requires_grad=False)
        self.W_out = nn.Parameter(W_out, requires_grad=False)

    def hidden(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W_in + self.b_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.hidden(x) @ self.W_out


class MultihopNet(nn.Module):
    """The residual network: ``x_{l+1} = x_l + MLP_l(x_l)`` over ``n_layers`` AND-MLPs."""

    E: Tensor  # [n_features, d_model] feature directions (a buffer)

    def __init__(self, n_chains: int = 2, n_layers: int = 3, d_model: int | None = None,
                 embed_seed: int | None = 0) -> None:
        super().__init__()
        self.layout = ChainLayout(n_chains, n_layers)
        n = self.layout.n_features
        self.register_buffer("E", embedding(n, n if d_model is None else d_model, embed_seed))
        self.mlps = nn.ModuleList([AndMLP(self.layout, self.E, layer) for layer in range(n_layers)])

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def d_model(self) -> int:
        return int(self.E.shape[1])

    def embed(self, a: Tensor) -> Tensor:
        """``x_0`` [B, d_model] from boolean inputs a [B, n_inputs] (0/1 floats)."""
        return a @ self.E[: self.layout.n_inputs]

    @torch.no_grad()
    def run(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, y)``: each layer's MLP input and output, layer-major [L, B, d_model] (a CLT's batch)."""
        x = self.embed(a)
        xs, ys = [], []
        for mlp in self.mlps:
            y = mlp(x)
            xs.append(x)
            ys.append(y)
            x = x + y
        return torch.stack(xs), torch.stack(ys)

    def features(self, x: Tensor) -> Tensor:
        """Read every feature off residual vectors [..., d_model] -> [..., n_features]."""
        return x @ self.E.T


def truth_table(layout: ChainLayout, a: Tensor) -> Tensor:
    """The intermediates by definition (no network): ``h[k, l] = AND(a[k, 0..l])`` [B, K * L]."""
    out = []
    for k in range(layout.n_chains):
        for l in range(1, layout.n_layers + 1):
            out.append(a[:, [layout.a(k, j) for j in range(l + 1)]].prod(dim=1))
    return torch.stack(out, dim=1)
