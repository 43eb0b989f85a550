"""Every member's loss terms of a :class:`~mechfaith.training.stack.CoderStack` at once.

Per member (means over the batch)::

    ||y_hat - y||^2 + s * (lam_tanh * sum_i tanh(c f_i ||W_dec,i||) + lam_l1 * sum_i f_i ||W_dec,i||)
      + jac * ||J_ref(x) v - J_coder(x) v||^2 + jcp * sum_i 1[pre_i > 0] ||W_enc,i|| ||W_dec,i||

with ``s`` the sparsity warm-up factor. ``J_ref(x) v`` comes from forward-mode autodiff
(``torch.func.jvp``) of the real reference (any MLP ``[..., d_in] -> [..., d_out]``, or one per
member); ``J_coder(x) v = ((v W_enc) * 1[pre > 0]) W_dec`` shares the forward pass, so the term's
gradient reaches the coders. Each term is computed only for the members that use it. TopK stacks
with only the L1 penalty (or none) on a shared batch take the sparse path (one block-diagonal
sparse product for all members).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from mechfaith.errors import ConfigError
from mechfaith.training.jacobian_matching import reference_jvp_one
from mechfaith.training.stack import CoderStack, StackSettings

Reference = Callable[[Tensor], Tensor]
References = Reference | Sequence[Reference]


@dataclass
class StackTerms:
    """Per-member loss terms, each [K] (``total`` with its graph), and what the metrics need."""

    mse: Tensor  # sum over d_out of the squared error, mean over the batch
    tanh_l1: Tensor
    l1: Tensor
    jacobian: Tensor
    jacobian_ref_sq: Tensor  # mean ||J_ref v||^2 (zero where the Jacobian term is off)
    jac_contrib: Tensor
    sparsity: Tensor  # the weighted penalty, times the warm-up factor
    total: Tensor
    fired: Tensor  # [K, n] inputs of the batch each latent fired on (no grad)
    target: Tensor  # [K, B, d_out] or [B, d_out] (shared), no grad


def targets(stack: CoderStack, x: Tensor, reference: References | None) -> Tensor:
    """The members' targets when the batch has none: x (SAEs) or the reference's output."""
    if stack.kind == "sae":
        return x
    if reference is None:
        raise ConfigError("the batch has no target and the stack has no reference function")
    with torch.no_grad():
        if callable(reference):
            return reference(x)
        xs = stack.expand_input(x)
        return torch.stack([ref(xs[i]) for i, ref in enumerate(reference)])


def _reference_jv(reference: References, xs: Tensor, vs: Tensor, idx: Tensor) -> Tensor:
    if callable(reference):
        return reference_jvp_one(reference, xs, vs)[1]
    return torch.stack([reference_jvp_one(reference[int(g)], xs[i], vs[i])[1] for i, g in enumerate(idx)])


def stack_losses(stack: CoderStack, x: Tensor, settings: StackSettings, reference: References | None = None,
                 v: Tensor | None = None, y: Tensor | None = None, sparsity_scale: float = 1.0,
                 bf16: bool = False) -> StackTerms:
    """Per-member loss terms for inputs x [B, d_in] (shared) or [K, B, d_in].

    ``y``: the targets ([B, d_out] shared or [K, B, d_out]); None: see :func:`targets`. ``v``
    [K, B, d_in] or [n_probes, K, B, d_in]: the Jacobian probes (needed when a member's Jacobian
    coefficient is nonzero). ``bf16``: the sparse TopK path's encoder matmul in bfloat16.
    """
    if y is None:
        y = targets(stack, x, reference)
    K = stack.n_members
    idx = settings.jacobian_members
    dense_only = bool((settings.lam_tanh > 0).any() or (settings.jac_contrib > 0).any()) or idx.numel() > 0
    if (stack.activation == "topk" and x.ndim == 2 and not dense_only and torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.float64)):
        y_hat, sums, fired = stack.forward_sparse_topk(x, bf16)
        mse = (y_hat - y).pow(2).sum(-1).mean(-1)  # [K]
        zero = torch.zeros_like(mse)
        l1 = (sums * stack.decoder_norms()).sum(-1) / x.shape[0] if bool((settings.lam_l1 > 0).any()) else zero
        lam_l1 = settings.lam_l1.to(mse.device, mse.dtype)  # settings stay on the CPU
        sparsity = sparsity_scale * (lam_l1 * l1)
        return StackTerms(mse=mse, tanh_l1=zero, l1=l1, jacobian=zero, jacobian_ref_sq=zero, jac_contrib=zero,
                          sparsity=sparsity, total=mse + sparsity, fired=fired, target=y)
    y_hat, f, pre = stack.forward_dense(x)
    mse = (y_hat - y).pow(2).sum(-1).mean(-1)  # [K]
    norms = stack.W_dec.norm(dim=-1)  # [K, n]
    zero = torch.zeros_like(mse)
    # l1 = mean_b sum_i f_i ||W_dec,i|| = mean_b (f @ norms): a matmul, no [K, B, n] temporary
    l1 = torch.bmm(f, norms.unsqueeze(-1)).squeeze(-1).mean(-1) if bool((settings.lam_l1 > 0).any()) else zero
    tanh = zero
    idx_t = torch.nonzero(settings.lam_tanh > 0).flatten()
    if idx_t.numel() == K:
        tanh = torch.tanh(f * (settings.tanh_c * norms).unsqueeze(1)).sum(-1).mean(-1)
    elif idx_t.numel():
        part = torch.tanh(f[idx_t] * (settings.tanh_c * norms[idx_t]).unsqueeze(1)).sum(-1).mean(-1)
        tanh = zero.index_put((idx_t,), part)
    need_jcp = bool((settings.jac_contrib > 0).any())
    mask = (pre > 0).to(f.dtype) if (need_jcp or idx.numel()) else None
    jcp = zero
    if need_jcp:
        assert mask is not None
        weight = stack.W_enc.norm(dim=1) * norms  # [K, n]  ||W_enc[:, i]|| ||W_dec[i]||
        jcp = torch.bmm(mask, weight.unsqueeze(-1)).squeeze(-1).mean(-1)
    jac, ref_sq = zero, zero
    if idx.numel():
        if v is None or reference is None:
            raise ConfigError("stack_losses: the Jacobian term needs a reference and probes v")
        assert mask is not None
        probes = v if v.ndim == 4 else v.unsqueeze(0)  # [P, K, B, d_in]
        xs, m = stack.expand_input(x)[idx], mask[idx]
        W_enc, W_dec = stack.W_enc[idx], stack.W_dec[idx]
        per_probe, per_ref = [], []
        for vp in probes:  # a few probes; each costs one forward-mode pass and two small matmuls
            vs = vp[idx]
            ref_jv = _reference_jv(reference, xs, vs, idx)
            coder_jv = torch.bmm(torch.bmm(vs, W_enc) * m, W_dec)  # [K', B, d_out]
            per_probe.append((coder_jv - ref_jv).pow(2).sum(-1).mean(-1))
            per_ref.append(ref_jv.pow(2).sum(-1).mean(-1))
        jac = zero.index_put((idx,), torch.stack(per_probe).mean(0))
        ref_sq = zero.index_put((idx,), torch.stack(per_ref).mean(0))
    h = {k: getattr(settings, k).to(mse.device, mse.dtype) for k in ("lam_tanh", "lam_l1", "jacobian", "jac_contrib")}
    sparsity = sparsity_scale * (h["lam_tanh"] * tanh + h["lam_l1"] * l1)
    total = mse + sparsity + h["jacobian"] * jac + h["jac_contrib"] * jcp
    return StackTerms(mse=mse, tanh_l1=tanh, l1=l1, jacobian=jac, jacobian_ref_sq=ref_sq, jac_contrib=jcp,
                      sparsity=sparsity, total=total, fired=(f.detach() > 0).sum(dim=1), target=y)
