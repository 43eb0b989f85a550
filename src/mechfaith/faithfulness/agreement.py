"""Jacobian agreement between a coder and the function it replaces, on many inputs, by group.

Two views, both on plain tensors and a reference function ``[n, d_in] -> [n, d_out]`` (the toy MLP,
a language model's MLP from :meth:`ModelAdapter.mlp_function`, any row-wise function):

- :func:`jacobian_agreement`: the relative error ``E||J_ref v - J_tc v||^2 / E||J_ref v||^2`` with
  Gaussian probes ``v ~ N(0, I)`` (so it estimates ``sum_b ||J_ref - J_tc||_F^2 / sum_b
  ||J_ref||_F^2``), computed in chunks of rows, per group of rows (e.g. BOS vs other positions),
  with the standard errors of :mod:`mechfaith.faithfulness.jacobian` (the input is the unit of
  sampling; delta-method standard error of the ratio of means).
- :func:`jacobian_spectra`: the exact Jacobians of both on a small sample, and their singular values
  side by side. An MLP in superposition is expected to have a long tail of small singular values
  that a sparse coder (rank at most its number of active latents, plus its skip) does not chase;
  :func:`spectrum_summary` condenses a spectrum to its effective rank, the share of squared
  Frobenius mass outside the top-k directions and the mean normalised spectrum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from mechfaith.errors import InputError
from mechfaith.faithfulness.jacobian import JvpErrorEstimate, check_x, coder_jacobians, exact_jacobians
from mechfaith.faithfulness.jacobian import per_row_jvp_errors as core_per_row_jvp_errors

Fn = Callable[[Tensor], Tensor]


@torch.no_grad()
def per_row_jvp_errors(reference: Fn, coder: Fn, x: Tensor, n_probes: int = 8,
                       generator: torch.Generator | None = None,
                       chunk_size: int = 2048) -> tuple[Tensor, Tensor]:
    """Per input, the probe means ``e_b = mean_p ||J_ref v - J_tc v||^2`` and ``r_b = mean_p
    ||J_ref v||^2`` (two float64 tensors [batch]); rows are processed ``chunk_size`` at a time
    through the core estimator (so one chunk draws exactly the core's probes)."""
    check_x(x)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    errs, refs = [], []
    for i in range(0, x.shape[0], chunk_size):
        err, ref = core_per_row_jvp_errors(reference, coder, x[i:i + chunk_size], n_probes, generator)
        errs.append(err)
        refs.append(ref)
    return torch.cat(errs), torch.cat(refs)


def ratio_of_means(num: Tensor, den: Tensor) -> tuple[float, float]:
    """``R = mean(num) / mean(den)`` and its delta-method standard error (NaN when undefined)."""
    n = num.shape[0]
    num, den = num.double(), den.double()
    d_mean = float(den.mean()) if n else float("nan")
    if n == 0 or not d_mean > 0:
        return float("nan"), float("nan")
    r = float(num.mean()) / d_mean
    if n < 2:
        return r, float("nan")
    resid = num - r * den
    return r, math.sqrt(float(resid.pow(2).sum()) / (n * (n - 1))) / d_mean


def summarize_errors(err: Tensor, ref: Tensor, n_probes: int) -> JvpErrorEstimate:
    """A :class:`JvpErrorEstimate` from per-row values (same statistics as ``jvp_error_estimate``)."""
    n = int(err.shape[0])
    if n == 0:
        nan = float("nan")
        return JvpErrorEstimate(nan, nan, nan, nan, nan, 0, n_probes)
    e_mean, r_mean = float(err.mean()), float(ref.mean())
    e_se = float(err.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    rel, rel_se = ratio_of_means(err, ref)
    return JvpErrorEstimate(e_mean, e_se, r_mean, rel, rel_se, n, n_probes)


def jacobian_agreement(reference: Fn, coder: Fn, x: Tensor, groups: Mapping[str, Tensor] | None = None,
                       n_probes: int = 8, generator: torch.Generator | None = None,
                       chunk_size: int = 2048) -> dict[str, dict[str, float]]:
    """The JVP estimate of the Jacobian error on all rows (``"all"``) and on each group.

    ``groups``: name -> bool mask [batch] (e.g. ``{"bos": pos == 0, "other": pos > 0}``); empty
    groups are reported with NaN and ``n_inputs = 0``. Returns ``{name: JvpErrorEstimate as dict}``.
    """
    err, ref = per_row_jvp_errors(reference, coder, x, n_probes, generator, chunk_size)
    out = {"all": asdict(summarize_errors(err, ref, n_probes))}
    for name, mask in (groups or {}).items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (x.shape[0],):
            raise InputError(f"group {name!r} must be a bool mask of shape [{x.shape[0]}]")
        m = mask.to(err.device)
        out[name] = asdict(summarize_errors(err[m], ref[m], n_probes))
    return out


@dataclass
class Spectra:
    """Singular values of the exact Jacobians of the reference and the coder on a sample."""

    reference: Tensor  # [n, r] descending, r = min(d_in, d_out)
    coder: Tensor  # [n, r] descending
    frobenius_rel_error: float  # sum_b ||J_ref - J_tc||_F^2 / sum_b ||J_ref||_F^2 (exact)


@torch.no_grad()
def jacobian_spectra(reference: Fn, coder: Fn, x: Tensor, chunk_size: int = 16) -> Spectra:
    """Exact Jacobians of both functions at each row of ``x`` [n, d_in] and their singular values."""
    check_x(x)
    j_ref = exact_jacobians(reference, x, chunk_size)
    j_tc = coder_jacobians(coder, x, chunk_size)
    if j_ref.shape != j_tc.shape:
        raise InputError(f"reference Jacobians have shape {tuple(j_ref.shape)}, the coder's "
                         f"{tuple(j_tc.shape)}: the two do not map the same spaces")
    rel = float((j_ref - j_tc).double().pow(2).sum() / j_ref.double().pow(2).sum().clamp_min(1e-300))
    return Spectra(torch.linalg.svdvals(j_ref.double()).float(), torch.linalg.svdvals(j_tc.double()).float(),
                   rel)


def spectrum_summary(sv: Tensor, top_k: int = 32, rank_tol: float = 1e-6) -> dict[str, object]:
    """Condense singular values [n, r] (each row descending) into scale-free numbers.

    - ``effective_rank``: mean over rows of ``exp(H(p))`` with ``p_k = s_k^2 / sum s^2`` (1 for a
      rank-one Jacobian, r for a flat spectrum).
    - ``numerical_rank``: mean count of ``s_k > rank_tol * s_1``.
    - ``tail_mass``: mean share of ``sum s^2`` beyond the top ``top_k`` directions (the
      "superposition tail").
    - ``mean_normalized``: the mean over rows of ``s / s_1`` (list of r numbers, for plotting).
    """
    if sv.ndim != 2 or sv.shape[0] == 0:
        raise InputError(f"singular values must be [n, r] with n >= 1, got {tuple(sv.shape)}")
    s = sv.double()
    s2 = s.pow(2)
    tot = s2.sum(1, keepdim=True).clamp_min(1e-300)
    p = s2 / tot
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    top = s[:, :1].clamp_min(1e-300)
    k = min(top_k, s.shape[1])
    return {
        "effective_rank": float(ent.exp().mean()),
        "numerical_rank": float((s > rank_tol * top).sum(1).double().mean()),
        "tail_mass": float((s2[:, k:].sum(1) / tot[:, 0]).mean()),
        "top_k": k,
        "mean_normalized": [float(v) for v in (s / top).mean(0)],
        "mean_top_singular_value": float(top.mean()),
    }


def spectra_report(spectra: Spectra, top_k: int = 32) -> dict[str, object]:
    """JSON-ready summary of :class:`Spectra` (both summaries and the exact relative error)."""
    return {"n_inputs": int(spectra.reference.shape[0]),
            "reference": spectrum_summary(spectra.reference, top_k),
            "coder": spectrum_summary(spectra.coder, top_k),
            "frobenius_rel_error_exact": spectra.frobenius_rel_error}

