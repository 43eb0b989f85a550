"""How far a coder's Jacobian is from the reference's (the real MLP's): exact and estimated.

Three tools, from slow and exact to fast and statistical:

- :func:`exact_jacobians`: full Jacobians ``[batch, d_out, d_in]`` of any module or function by
  ``torch.func`` (``vmap(jacfwd)``), in chunks of inputs to bound memory. The reference path for
  tests and small models (cost: d_in forward-mode passes per input).
- :func:`frobenius_error_exact`: the mean over inputs of ``||J_ref(x) - J_tc(x)||_F^2`` from exact
  Jacobians; differentiable in the coder's parameters (never in the reference's or the input).
- :func:`jvp_error_estimate`: the same quantity estimated with Gaussian probes,
  ``E_v ||J_ref v - J_tc v||^2 = ||J_ref - J_tc||_F^2`` for ``v ~ N(0, I)``, from Jacobian-vector
  products only (a small multiple of a forward pass, any width), with its standard error, next to
  ``E_v ||J_ref v||^2 = ||J_ref||_F^2`` and the relative error (their ratio) with its standard error.

Statistics of :func:`jvp_error_estimate`. The unit of sampling is the input: for each input ``x_b``
the probe values are averaged, ``e_b = mean_p ||J_ref v_bp - J_tc v_bp||^2`` and
``r_b = mean_p ||J_ref v_bp||^2``; the inputs are treated as an i.i.d. sample of the data, so the
standard errors cover both the probe noise and the choice of inputs.

- ``sq_error = mean_b e_b``, ``sq_error_se = std_b(e_b) / sqrt(B)``.
- ``rel_error = mean_b e_b / mean_b r_b`` (a ratio of means, not a mean of ratios), with the
  delta-method standard error of a ratio estimator:
  ``rel_error_se = sqrt( sum_b (e_b - R r_b)^2 / (B (B - 1)) ) / mean_b r_b``. No bootstrap.

Coders are used as they are: put a BatchTopK coder in eval mode first (its training-mode forward
updates its threshold and couples the rows of a batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.errors import InputError
from mechfaith.training.fast_jvp import linear_jvp_mode

Fn = Callable[[Tensor], Tensor]


def check_x(x: Tensor) -> None:
    """Raise :class:`InputError` unless ``x`` is a floating-point tensor [batch, d_in], batch >= 1."""
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"x has shape {tuple(x.shape)}; expected [batch, d_in] with batch >= 1")


def exact_jacobians(fn: Fn, x: Tensor, chunk_size: int = 64) -> Tensor:
    """Jacobians ``d fn(x)_b / d x_b`` [batch, d_out, d_in] of a row-wise function of x [batch, d_in].

    ``fn`` maps [n, d_in] -> [n, d_out] row by row (an MLP, a coder in eval mode, a lambda).
    Computed with ``torch.func.vmap(torch.func.jacfwd(...))`` over ``chunk_size`` inputs at a time.
    The result is differentiable in tensors ``fn`` captures that require grad (e.g. a coder's
    parameters); wrap the call in ``torch.no_grad()`` when that is not wanted.
    """
    check_x(x)
    if chunk_size <= 0:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")

    def one(xi: Tensor) -> Tensor:  # [d_in] -> [d_out]
        return fn(xi.unsqueeze(0)).squeeze(0)

    per_row = torch.func.vmap(torch.func.jacfwd(one))
    chunks = [per_row(x[i:i + chunk_size]) for i in range(0, x.shape[0], chunk_size)]
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def coder_jacobians(coder: Fn, x: Tensor, chunk_size: int = 64) -> Tensor:
    """Exact Jacobians of a coder: closed form for a :class:`SparseCoder`, torch.func otherwise."""
    if isinstance(coder, SparseCoder):
        return coder.jacobian(x)
    return exact_jacobians(coder, x, chunk_size)


def frobenius_error_exact(reference: Fn, coder: Fn, x: Tensor, chunk_size: int = 64) -> Tensor:
    """``mean_b ||J_ref(x_b) - J_tc(x_b)||_F^2`` (scalar) from exact Jacobians.

    Differentiable in the coder's parameters; the reference's Jacobians carry no graph.
    """
    check_x(x)
    with torch.no_grad():
        j_ref = exact_jacobians(reference, x.detach(), chunk_size)
    j_tc = coder_jacobians(coder, x.detach(), chunk_size)
    if j_ref.shape != j_tc.shape:
        raise InputError(f"reference Jacobians have shape {tuple(j_ref.shape)}, the coder's "
                         f"{tuple(j_tc.shape)}: the two do not map the same spaces")
    return (j_ref - j_tc).pow(2).sum(dim=(1, 2)).mean()


@dataclass
class JvpErrorEstimate:
    """Probe estimate of the Jacobian error of a coder on a batch of inputs (see module doc)."""

    sq_error: float  # mean over inputs and probes of ||J_ref v - J_tc v||^2 (estimates ||.||_F^2)
    sq_error_se: float  # its standard error
    ref_sq: float  # mean of ||J_ref v||^2 (estimates ||J_ref||_F^2)
    rel_error: float  # sq_error / ref_sq (ratio of means)
    rel_error_se: float  # delta-method standard error of rel_error
    n_inputs: int
    n_probes: int


def _jvp(fn: Fn, x: Tensor, v: Tensor) -> Tensor:
    if isinstance(fn, SparseCoder):
        return fn.forward_with_jvp(x, v)[1]
    with linear_jvp_mode():  # called under no_grad: nn.Linear JVPs skip the zero weight tangent
        return torch.func.jvp(fn, (x,), (v,))[1]


def per_row_jvp_errors(reference: Fn, coder: Fn, x: Tensor, n_probes: int = 16,
                       generator: torch.Generator | None = None,
                       max_rows: int = 65536) -> tuple[Tensor, Tensor]:
    """Per input, ``e_b = mean_p ||J_ref v - J_tc v||^2`` and ``r_b = mean_p ||J_ref v||^2``
    (two float64 tensors [batch]).

    Probes are batched: each call of the JVPs sees up to ``max_rows`` rows (the inputs repeated once
    per probe, probe-major), so both functions must act row by row.
    """
    check_x(x)
    if n_probes < 1:
        raise InputError(f"n_probes must be >= 1, got {n_probes}")
    batch = x.shape[0]
    err = x.new_zeros(batch, dtype=torch.float64)
    ref = x.new_zeros(batch, dtype=torch.float64)
    per_call = max(1, max_rows // max(batch, 1))
    with torch.no_grad():
        done = 0
        while done < n_probes:
            p = min(per_call, n_probes - done)
            xs = x.repeat(p, 1)  # [p * batch, d_in], probe-major
            v = torch.randn(xs.shape, generator=generator, dtype=x.dtype, device=x.device)
            a = _jvp(reference, xs, v)
            c = _jvp(coder, xs, v)
            if a.shape != c.shape:
                raise InputError(f"reference JVP has shape {tuple(a.shape)}, the coder's "
                                 f"{tuple(c.shape)}: the two do not map the same spaces")
            err += (a - c).double().pow(2).sum(dim=-1).view(p, batch).sum(dim=0)
            ref += a.double().pow(2).sum(dim=-1).view(p, batch).sum(dim=0)
            done += p
    return err / n_probes, ref / n_probes


def jvp_error_estimate(reference: Fn, coder: Fn, x: Tensor, n_probes: int = 16,
                       generator: torch.Generator | None = None,
                       max_rows: int = 65536) -> JvpErrorEstimate:
    """Estimate ``mean_b ||J_ref(x_b) - J_tc(x_b)||_F^2`` with ``n_probes`` Gaussian probes per input
    (see :func:`per_row_jvp_errors`), with standard errors over inputs."""
    err, ref = per_row_jvp_errors(reference, coder, x, n_probes, generator, max_rows)
    batch = x.shape[0]
    e_mean, r_mean = float(err.mean()), float(ref.mean())
    nan = float("nan")
    if batch > 1:
        e_se = float(err.std(unbiased=True)) / math.sqrt(batch)
    else:
        e_se = nan
    rel = e_mean / r_mean if r_mean > 0 else nan
    if batch > 1 and r_mean > 0:
        resid = err - rel * ref
        rel_se = math.sqrt(float(resid.pow(2).sum()) / (batch * (batch - 1))) / r_mean
    else:
        rel_se = nan
    return JvpErrorEstimate(e_mean, e_se, r_mean, rel, rel_se, batch, n_probes)
