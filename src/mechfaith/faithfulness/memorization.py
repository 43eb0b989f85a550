"""Memorization of a datapoint by a sparse coder's features (after "A Toy Model of Mechanistic
(Un)Faithfulness"), and a detector of datapoint features.

Definitions (``p`` a datapoint [d_in]; for a transcoder its target lives in the same coordinates,
``d_out == d_in``, as in the toy task where the target of ``p`` is ``|p| = p``):

- Contribution of feature i to the output at x: ``y|f_i(x) = f_i(x) W_dec[i]`` [d_out]
  (the decoder bias and a skip connection belong to no feature).
- Memorization of feature i on p::

      m(f_i, p) = ReLU( y|f_i(p) . p_hat  -  max_{j in S} y|f_i(p) . e_j )

  with ``p_hat = p / ||p||`` and S the support of p (the coordinates where p != 0; for
  ``p = [1, 1, 1, 0, ...]`` this is the post's ``max_{j<3}``). A feature that writes one
  coordinate (an ideal ``ReLU(+-x_j)`` feature) scores 0, because ``e_j . p_hat < 1``; a feature
  that writes ``a p`` (a >= 0) scores ``a (||p|| - max_j p_j)``, i.e. ``a (sqrt(k) - 1)`` for a
  0/1 datapoint with k ones (0.732 a for k = 3).
- Memorization of a model: ``sum_i m(f_i, p)``.
- A datapoint feature: ``m(f_i, p) > threshold`` (default 0.1, i.e. it writes at least about
  0.14 p at p beyond its best single coordinate) -- it fires on p and writes (a multiple of) p.

All functions take a :class:`~mechfaith.coders.SparseCoder`; nothing here is specific to the toy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechfaith.coders import SparseCoder
from mechfaith.errors import InputError

DEFAULT_THRESHOLD = 0.1


def _check_point(coder: SparseCoder, p: Tensor) -> Tensor:
    if not isinstance(p, Tensor) or p.ndim != 1 or p.shape[0] != coder.d_in:
        raise InputError(f"datapoint p must be a 1-D tensor of length d_in = {coder.d_in}, "
                         f"got {tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__}")
    if coder.d_out != coder.d_in:
        raise InputError(f"memorization needs d_out == d_in (outputs in the coordinates of p); "
                         f"the coder maps {coder.d_in} -> {coder.d_out}")
    if not torch.isfinite(p).all() or float(p.norm()) == 0.0:
        raise InputError("datapoint p must be finite and nonzero")
    return p.to(coder.W_enc.dtype)


@torch.no_grad()
def feature_contributions(coder: SparseCoder, x: Tensor) -> Tensor:
    """``y|f_i(x) = f_i(x) W_dec[i]`` for every input and feature: [batch, n_latents, d_out]."""
    x2 = coder.check_input(x)
    f = coder.forward_full(x2).f  # [batch, n]
    return f.unsqueeze(-1) * coder.W_dec.unsqueeze(0)


@torch.no_grad()
def feature_memorization(coder: SparseCoder, p: Tensor) -> Tensor:
    """``m(f_i, p)`` for every feature i: [n_latents] (see the module docstring)."""
    p = _check_point(coder, p)
    contrib = feature_contributions(coder, p.unsqueeze(0))[0]  # [n, d]
    along_p = contrib @ (p / p.norm())  # [n]
    support = torch.nonzero(p != 0).flatten()
    best_axis = contrib[:, support].max(dim=1).values  # [n]
    return torch.relu(along_p - best_axis)


def model_memorization(coder: SparseCoder, p: Tensor) -> float:
    """``sum_i m(f_i, p)``."""
    return float(feature_memorization(coder, p).sum())


@dataclass
class DatapointFeature:
    """One feature detected as a datapoint feature."""

    index: int
    memorization: float  # m(f_i, p)
    activation_at_p: float  # f_i(p)
    cosine_to_p: float  # cosine between W_dec[i] and p
    firing_rate: float | None  # fraction of a reference sample on which f_i > 0 (None if no sample)


@torch.no_grad()
def find_datapoint_features(coder: SparseCoder, p: Tensor, threshold: float = DEFAULT_THRESHOLD,
                            sample: Tensor | None = None) -> list[DatapointFeature]:
    """Features with ``m(f_i, p) > threshold``, largest first (``sample``: optional inputs
    [batch, d_in] on which to report each feature's firing rate)."""
    p = _check_point(coder, p)
    m = feature_memorization(coder, p)
    f_p = coder.forward_full(p.unsqueeze(0)).f[0]
    cos = torch.nn.functional.cosine_similarity(coder.W_dec, p.unsqueeze(0), dim=1)
    rates = None
    if sample is not None:
        rates = (coder.forward_full(coder.check_input(sample, "sample")).f > 0).float().mean(0)
    found = [DatapointFeature(int(i), float(m[i]), float(f_p[i]), float(cos[i]),
                              None if rates is None else float(rates[i]))
             for i in torch.nonzero(m > threshold).flatten().tolist()]
    return sorted(found, key=lambda d: -d.memorization)


@dataclass
class JacobianAtPoint:
    """The coder's Jacobian at p compared with a reference Jacobian."""

    jacobian: Tensor  # [d_out, d_in]
    error_fro: float  # ||J_coder(p) - J_ref(p)||_F
    offdiag_support: float  # sum of |J_ij|, i != j, i and j in the support of p


@torch.no_grad()
def jacobian_at_point(coder: SparseCoder, p: Tensor, reference_jacobian: Tensor) -> JacobianAtPoint:
    """The coder's exact Jacobian at ``p`` and how far it is from ``reference_jacobian`` [d_out, d_in]."""
    p = _check_point(coder, p)
    jac = coder.jacobian(p.unsqueeze(0))[0]
    if reference_jacobian.shape != jac.shape:
        raise InputError(f"reference Jacobian has shape {tuple(reference_jacobian.shape)}, "
                         f"expected {tuple(jac.shape)}")
    support = torch.nonzero(p != 0).flatten()
    block = jac[support][:, support]
    off = block - torch.diag_embed(torch.diagonal(block))
    return JacobianAtPoint(jac, float((jac - reference_jacobian.to(jac.dtype)).norm()),
                           float(off.abs().sum()))
