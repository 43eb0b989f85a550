"""Jacobian matching: ``E_v ||J_ref(x) v - J_coder(x) v||^2`` with Gaussian probes ``v ~ N(0, I)``.

Since ``E_v ||A v||^2 = ||A||_F^2`` for ``v ~ N(0, I)``, the mean over probes is an unbiased estimate
of the squared Frobenius distance between the two Jacobians, at the cost of Jacobian-vector
products (forward-mode autodiff), never a full Jacobian.

- The reference (the real MLP: any module or function ``[batch, d_in] -> [batch, d_out]``) is
  differentiated with ``torch.func.jvp`` under ``torch.no_grad()``: no gradient ever reaches its
  parameters or the inputs.
- The coder's JVP is computed in closed form next to its forward pass
  (:meth:`SparseCoder.forward_with_jvp`), sharing the pre-activations and the derivative mask, so the
  term's gradient reaches exactly the coder's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, cast

import torch
from torch import Tensor

from mechfaith.coders.coder import CoderOutput, SparseCoder
from mechfaith.training.fast_jvp import linear_jvp_mode

Reference = Callable[[Tensor], Tensor]


def sample_probes(x: Tensor, n_probes: int, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian probe vectors [n_probes, batch, d_in] (or [batch, d_in] when n_probes == 1)."""
    shape = (x.shape[0], x.shape[1]) if n_probes == 1 else (n_probes, x.shape[0], x.shape[1])
    return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)


def global_probes(x: Tensor, n_probes: int, generator: torch.Generator | None, rank: int, world: int,
                  row_dim: int = 0) -> Tensor:
    """This data-parallel rank's probes: the draw one process makes for the global batch (``world``
    ranks' rows of ``x`` concatenated along ``row_dim``), narrowed to rank ``rank``'s rows, so that N
    ranks train with the probes one process would ([n_probes, *x.shape], or x's shape for one)."""
    shape = list(x.shape)
    rows = shape[row_dim]
    shape[row_dim] = rows * world
    if n_probes > 1:
        shape, row_dim = [n_probes, *shape], row_dim + 1
    v = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    return v.narrow(row_dim, rank * rows, rows)


def reference_jvp_one(reference: Reference, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(reference(x), J_ref(x) v)`` for one probe ``v`` shaped like ``x`` (any leading shape, e.g.
    a stack's [K, batch, d]), with no autograd graph: no gradient reaches the reference."""
    with torch.no_grad(), linear_jvp_mode():  # nn.Linear JVPs without the zero weight-tangent matmul
        # torch.func.jvp is typed for has_aux too (a 3-tuple); without aux it is (primal, tangent)
        y, jv = cast(tuple[Tensor, Tensor], torch.func.jvp(reference, (x,), (v,)))
    return y, jv


def reference_jvp(reference: Reference, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(reference(x), J_ref(x) v)`` with no autograd graph. ``v`` is [batch, d] or [probes, batch, d]."""
    if v.ndim == 2:
        return reference_jvp_one(reference, x, v)
    ys, jvs = [], []
    for vi in v:  # a few probes: a loop reuses no memory across probes and stays simple
        y, jv = reference_jvp_one(reference, x, vi)
        ys.append(y)
        jvs.append(jv)
    return ys[0], torch.stack(jvs)


@dataclass
class JacobianMatch:
    """The Jacobian-matching term of one batch and what it was computed from."""

    loss: Tensor  # scalar, mean over batch and probes of ||J_ref v - J_coder v||^2 (differentiable)
    out: CoderOutput  # the coder's forward pass at x (reuse it for the reconstruction loss)
    ref_jv_sq: Tensor  # scalar, mean ||J_ref v||^2 (for the relative error), no grad
    ref_y: Tensor | None = None  # [batch, d_out] reference(x), the jvp's primal (a free target), no grad


def jacobian_matching(coder: SparseCoder, reference: Reference, x: Tensor, n_probes: int = 1,
                      generator: torch.Generator | None = None,
                      v: Tensor | None = None) -> JacobianMatch:
    """The coder's forward pass at ``x`` [batch, d_in] together with the Jacobian-matching term."""
    if v is None:
        v = sample_probes(x, n_probes, generator)
    ref_y, ref_jv = reference_jvp(reference, x, v)
    out, coder_jv = coder.forward_with_jvp(x, v)
    diff = coder_jv - ref_jv
    loss = diff.pow(2).sum(dim=-1).mean()
    return JacobianMatch(loss, out, ref_jv.pow(2).sum(dim=-1).mean(), ref_y)
