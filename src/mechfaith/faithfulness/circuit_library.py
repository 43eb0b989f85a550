"""The circuit-library map: explain each learned feature as a sparse non-negative combination of
"ideal" circuits, over one shared sample of inputs (after "A Toy Model of Mechanistic
(Un)Faithfulness").

A *circuit* is any function ``x [S, d_in] -> contribution [S, d_out]`` (for the toy: ``y_i +=
ReLU(x_i)``, ``y_i += ReLU(-x_i)``, the datapoint circuit). A learned feature's contribution is
``f_i(x) W_dec[i]``. Flattening over the shared sample gives vectors in R^(S * d_out): the library
matrix ``A`` [S*d_out, L] and the feature vectors ``v_i``.

Solver (documented choice): non-negative lasso on unit-normalised library columns,

    c_i = argmin_{c >= 0}  1/2 ||A_hat c - v_i||^2 + alpha ||v_i|| sum_k c_k,    A_hat = A / ||A_k||,

solved by cyclic coordinate descent on the Gram matrix ``A_hat^T A_hat`` (exact coordinate
minimisers ``c_k = max(0, (b_k - sum_{j != k} G_kj c_j - alpha ||v||) / G_kk)``; the problem is
convex, so this converges to the global minimum; stopped when no coefficient moves by more than
``tol * ||v||``). Scaling the L1 weight by ``||v_i||`` makes the decomposition invariant to the
feature's scale. Non-negativity reflects that a feature *is* (a part of) a circuit, not its
negative; the small L1 term picks the sparsest explanation when library circuits overlap (the
datapoint circuit overlaps the ReLU(x_j) circuits on p).

Reported per feature: ``share[k] = c_k / ||v||`` (the fraction of the feature's contribution that
circuit k accounts for, in norm units; 1 means "is exactly that circuit") and the residual
``||v - A_hat c|| / ||v||`` (0: fully explained; 1: nothing explained). Features that never fire
on the sample have ``||v|| = 0`` and are marked dead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from mechfaith.coders import SparseCoder
from mechfaith.errors import ConfigError, InputError
from mechfaith.faithfulness.memorization import feature_contributions

Circuit = Callable[[Tensor], Tensor]


@dataclass
class CircuitLibrary:
    """Named ideal circuits, each ``x [S, d_in] -> contribution [S, d_out]``."""

    names: list[str]
    circuits: list[Circuit]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.circuits) or not self.names:
            raise ConfigError("CircuitLibrary needs one name per circuit (and at least one)")

    def __len__(self) -> int:
        return len(self.names)

    def matrix(self, sample: Tensor) -> Tensor:
        """The library's contribution vectors over ``sample``: [S * d_out, L]."""
        return torch.stack([c(sample).reshape(-1) for c in self.circuits], dim=1)


def nonneg_lasso(A: Tensor, V: Tensor, alpha: float = 1e-3, max_iter: int = 500,
                 tol: float = 1e-7) -> Tensor:
    """``argmin_{c >= 0} 1/2 ||A c - v||^2 + alpha ||v|| sum(c)`` for each column v of V.

    A [m, L], V [m, F] -> C [L, F]. Cyclic coordinate descent on the Gram matrix (all F problems
    at once; see the module docstring). Columns of A must be nonzero.
    """
    if A.ndim != 2 or V.ndim != 2 or A.shape[0] != V.shape[0]:
        raise InputError(f"nonneg_lasso: A {tuple(A.shape)} and V {tuple(V.shape)} do not match")
    A = A.double()
    V = V.double()
    G = A.T @ A  # [L, L]
    diag = torch.diagonal(G)
    if bool((diag <= 0).any()):
        raise InputError("nonneg_lasso: the library has an all-zero column (a circuit that never "
                         "contributes on the sample)")
    B = A.T @ V  # [L, F]
    vnorm = V.norm(dim=0)  # [F]
    lam = alpha * vnorm
    C = torch.zeros_like(B)
    for _ in range(max_iter):
        moved = torch.zeros_like(vnorm)
        for k in range(G.shape[0]):
            # residual correlation excluding k:  B_k - sum_j G_kj C_j + G_kk C_k
            r = B[k] - G[k] @ C + diag[k] * C[k]
            new = torch.clamp((r - lam) / diag[k], min=0.0)
            moved = torch.maximum(moved, (new - C[k]).abs())
            C[k] = new
        if bool((moved <= tol * vnorm.clamp_min(1e-30)).all()):
            break
    return C


@dataclass
class Decomposition:
    """The circuit-library map of one coder."""

    names: list[str]  # library circuit names, then "residual"
    coef: Tensor  # [L, n_latents] non-negative lasso coefficients on unit-normalised circuits
    share: Tensor  # [L + 1, n_latents] coef / ||v|| per circuit, then the residual fraction
    norms: Tensor  # [n_latents] ||v_i||, the size of each feature's contribution over the sample
    alive: Tensor  # [n_latents] bool, the feature fired on the sample

    def best(self) -> Tensor:
        """Index of the circuit with the largest share for each feature [n_latents] (-1 if dead)."""
        idx = self.share[:-1].argmax(dim=0)
        return torch.where(self.alive, idx, torch.full_like(idx, -1))

    def order(self) -> list[int]:
        """Live features ordered by their best circuit (then by share), so the map shows a diagonal;
        dead features last."""
        best = self.best()
        top = self.share[:-1].max(dim=0).values
        live = [i for i in range(best.numel()) if best[i] >= 0]
        live.sort(key=lambda i: (int(best[i]), -float(top[i])))
        return live + [i for i in range(best.numel()) if best[i] < 0]

    def residual(self) -> Tensor:
        """Residual fraction per feature [n_latents] (0 for dead features)."""
        return self.share[-1]


@torch.no_grad()
def decompose(coder: SparseCoder, library: CircuitLibrary, sample: Tensor, alpha: float = 1e-3,
              max_iter: int = 500) -> Decomposition:
    """Explain each feature of ``coder`` by the ``library`` over the shared ``sample`` [S, d_in]."""
    x = coder.check_input(sample, "sample").to(coder.W_enc.dtype)
    A = library.matrix(x)  # [S*d_out, L]
    if A.shape[0] != x.shape[0] * coder.d_out:
        raise InputError(f"library circuits return {A.shape[0] // x.shape[0]} outputs per input; "
                         f"the coder has d_out = {coder.d_out}")
    col = A.norm(dim=0)
    if bool((col == 0).any()):
        dead = [library.names[k] for k in torch.nonzero(col == 0).flatten().tolist()]
        raise InputError(f"library circuit(s) never contribute on the sample: {', '.join(dead)} "
                         f"(add such inputs to the sample)")
    A_hat = A / col
    contrib = feature_contributions(coder, x)  # [S, n, d_out]
    V = contrib.permute(1, 0, 2).reshape(coder.n_latents, -1).T  # [S*d_out, n]
    C = nonneg_lasso(A_hat, V, alpha=alpha, max_iter=max_iter)  # [L, n]
    vnorm = V.double().norm(dim=0)
    alive = vnorm > 0
    safe = vnorm.clamp_min(1e-30)
    resid = (V.double() - A_hat.double() @ C).norm(dim=0) / safe
    share = torch.cat([C / safe, resid.unsqueeze(0)], dim=0)
    share = torch.where(alive.unsqueeze(0), share, torch.zeros_like(share))
    return Decomposition(list(library.names) + ["residual"], C.float(), share.float(),
                         vnorm.float(), alive)


def stack_circuits(names: Sequence[str], circuits: Sequence[Circuit]) -> CircuitLibrary:
    """A :class:`CircuitLibrary` from parallel lists."""
    return CircuitLibrary(list(names), list(circuits))
