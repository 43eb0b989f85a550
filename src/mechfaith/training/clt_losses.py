"""The loss terms of a cross-layer transcoder on one batch (layer-major: x [L, B, d_in]).

    recon    = sum_{t, o} (y_hat[t] - y[t])^2 / B              (summed over layers and outputs)
    sparsity = tanh_l1: sum_{s, i} tanh(c f[s, i] ||W_dec,s,i||) / B
               l1:      sum_{s, i} f[s, i] ||W_dec,s,i|| / B
               l0:      sum_{s, i} H(pre[s, i] - theta[s, i]) / B   (JumpReLU, straight-through)
    jacobian = E_v sum_t ||J_MLP_t(x[t]) v[t] - J_t v[t]||^2 / B   (local Jacobians, see coders.clt)

``||W_dec,s,i||`` is latent i's decoder norm summed over its target layers (a latent that writes
to many layers pays for each). The Jacobian term needs one forward-mode JVP of each real MLP
(``references[t]``) and one closed-form product per layer for the CLT: the cost of L per-layer
transcoders' Jacobian matching, never a full Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from mechfaith.coders import activations as acts
from mechfaith.coders.clt import CLTOutput, CrossLayerTranscoder
from mechfaith.errors import ConfigError
from mechfaith.training.jacobian_matching import reference_jvp_one

Reference = Callable[[Tensor], Tensor]

CLT_PENALTIES = ("none", "l1", "tanh_l1", "l0")


@dataclass
class CLTTerms:
    """The terms of one batch (tensors with their graph) and what the metrics need."""

    total: Tensor
    recon: Tensor
    sse: Tensor  # sum of squared errors (no division)
    out: CLTOutput
    target: Tensor  # [L, B, d_out], no grad
    sparsity: Tensor | None = None
    jacobian: Tensor | None = None
    jacobian_ref_sq: Tensor | None = None  # mean over the batch of sum_t ||J_MLP_t v[t]||^2


def clt_sparsity(name: str, clt: CrossLayerTranscoder, out: CLTOutput, c: float = 4.0) -> Tensor:
    """The unweighted sparsity penalty ``name`` of the module docstring."""
    B = out.f.shape[1]
    if name == "none":
        return out.f.new_zeros(())
    if name == "l1":
        return (out.f.sum(dim=1) * clt.decoder_norms()).sum() / B
    if name == "tanh_l1":
        return torch.tanh(c * out.f * clt.decoder_norms().unsqueeze(1)).sum() / B
    if name == "l0":
        if clt.log_threshold is None:
            raise ConfigError("the l0 penalty needs a JumpReLU CLT (activation = 'jumprelu')")
        return acts.step(out.pre, clt.threshold().unsqueeze(1), clt.cfg.jumprelu_bandwidth).sum() / B
    raise ConfigError(f"unknown sparsity penalty {name!r}; choose one of {', '.join(CLT_PENALTIES)}")


def reference_targets(references: Sequence[Reference], x: Tensor) -> Tensor:
    """``[references[t](x[t]) for t]`` [L, B, d_out], without a graph."""
    with torch.no_grad():
        return torch.stack([ref(x[t]) for t, ref in enumerate(references)])


def clt_jacobian(clt: CrossLayerTranscoder, out: CLTOutput, references: Sequence[Reference], x: Tensor,
                 v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, mean sum_t ||J_MLP_t v[t]||^2, reference outputs [L, B, d_out])`` for probes v
    [L, B, d_in] or [P, L, B, d_in]; the loss is differentiable in the CLT's parameters."""
    probes = v if v.ndim == 4 else v.unsqueeze(0)
    B = x.shape[1]
    losses, ref_sqs = [], []
    ref_y: Tensor | None = None
    for vp in probes:
        pairs = [reference_jvp_one(ref, x[t], vp[t]) for t, ref in enumerate(references)]
        ref_jv = torch.stack([jv for _, jv in pairs])  # [L, B, d_out]
        if ref_y is None:
            ref_y = torch.stack([y for y, _ in pairs])
        coder_jv = clt.local_jvp(out, vp)
        losses.append((coder_jv - ref_jv).pow(2).sum() / B)
        ref_sqs.append(ref_jv.pow(2).sum() / B)
    assert ref_y is not None
    return torch.stack(losses).mean(), torch.stack(ref_sqs).mean(), ref_y


def clt_losses(clt: CrossLayerTranscoder, x: Tensor, y: Tensor | None, *, sparsity: str = "none",
               sparsity_coef: float = 0.0, tanh_scale: float = 4.0, jacobian_coef: float = 0.0,
               references: Sequence[Reference] | None = None, v: Tensor | None = None) -> CLTTerms:
    """Every term for x [L, B, d_in] and targets y [L, B, d_out] (None: the references' outputs)."""
    if references is not None and len(references) != clt.n_layers:
        raise ConfigError(f"{len(references)} reference functions for a CLT of {clt.n_layers} layers")
    out = clt.forward_full(x)
    jac = ref_sq = None
    if jacobian_coef > 0:
        if references is None or v is None:
            raise ConfigError("Jacobian matching of a CLT needs one reference MLP per layer and probes")
        jac, ref_sq, ref_y = clt_jacobian(clt, out, references, x, v)
        if y is None:
            y = ref_y
    if y is None:
        if references is None:
            raise ConfigError("the batch has no target and the CLT has no reference functions")
        y = reference_targets(references, x)
    B = x.shape[1]
    sse = (out.y_hat - y).pow(2).sum()
    recon = sse / B
    total = recon
    terms = CLTTerms(total=total, recon=recon, sse=sse, out=out, target=y)
    if sparsity != "none" and sparsity_coef > 0:
        terms.sparsity = clt_sparsity(sparsity, clt, out, tanh_scale)
        total = total + sparsity_coef * terms.sparsity
    if jac is not None:
        terms.jacobian, terms.jacobian_ref_sq = jac, ref_sq
        total = total + jacobian_coef * jac
    terms.total = total
    return terms
