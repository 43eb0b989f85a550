"""Latent activations, one function each, and their derivative masks.

Every activation maps pre-activations ``pre`` [batch, n_latents] to latents ``f`` of the same shape
and returns the mask ``d f / d pre`` (almost everywhere, with ReLU'(0) = 0). That mask is what the
coder's exact Jacobian ``W_dec^T diag(mask) W_enc^T`` and its Jacobian-vector products use.
"""

from __future__ import annotations

import torch
from torch import Tensor


def relu(pre: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU; derivative 1[pre > 0]."""
    f = torch.relu(pre)
    return f, pre > 0


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k largest pre-activations of each row, then ReLU; the rest are 0."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    values = torch.relu(values)
    f = torch.zeros_like(pre).scatter(-1, indices, values)
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, indices, values > 0)
    return f, mask


def batchtopk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the ``k * batch`` largest pre-activations of the whole batch, then ReLU."""
    flat = pre.reshape(-1)
    n_keep = min(k * pre.shape[0], flat.numel())
    values, indices = flat.topk(n_keep, sorted=False)
    values = torch.relu(values)
    f = torch.zeros_like(flat).scatter(0, indices, values).reshape(pre.shape)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter(0, indices, values > 0).reshape(pre.shape)
    return f, mask


def threshold(pre: Tensor, theta: Tensor | float) -> tuple[Tensor, Tensor]:
    """``pre * 1[pre > theta]`` with a fixed threshold (BatchTopK at inference)."""
    mask = pre > theta
    return pre * mask, mask


class _JumpReLUFn(torch.autograd.Function):
    """JumpReLU ``pre * H(pre - theta)``: exact gradient in ``pre``; straight-through in ``theta``.

    d f / d theta = -(theta / eps) * K((pre - theta) / eps) with the rectangle kernel
    K(u) = 1[|u| < 1/2] (Rajamanoharan et al., 2024). Forward-mode (jvp) is exact in ``pre`` and
    treats theta as constant, so torch.func transforms work on coders that use it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        return pre * (pre > theta)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pre, theta, eps = inputs
        ctx.save_for_backward(pre, theta)
        ctx.save_for_forward(pre, theta)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = grad * (pre > theta)
        kernel = ((pre - theta).abs() < eps / 2).to(grad.dtype) / eps
        grad_theta = (-(theta * kernel) * grad).sum_to_size(theta.shape)
        return grad_pre, grad_theta, None

    @staticmethod
    def jvp(ctx, pre_t: Tensor | None, theta_t: Tensor | None, eps_t: None) -> Tensor:  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        if pre_t is None:
            return torch.zeros_like(pre)
        return pre_t * (pre > theta)


class _StepFn(torch.autograd.Function):
    """Heaviside ``H(pre - theta)`` with the straight-through threshold gradient, for the L0 penalty."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pre, theta, eps = inputs
        ctx.save_for_backward(pre, theta)
        ctx.save_for_forward(pre, theta)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((pre - theta).abs() < eps / 2).to(grad.dtype) / eps
        grad_theta = (-kernel * grad).sum_to_size(theta.shape)
        return None, grad_theta, None

    @staticmethod
    def jvp(ctx, pre_t: Tensor | None, theta_t: Tensor | None, eps_t: None) -> Tensor:  # type: ignore[override]
        pre, _ = ctx.saved_tensors
        return torch.zeros_like(pre)


def jumprelu(pre: Tensor, theta: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """JumpReLU with per-latent threshold ``theta`` [n_latents]."""
    f = _JumpReLUFn.apply(pre, theta, eps)
    return f, pre > theta


def step(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """``H(pre - theta)`` whose gradient reaches ``theta`` (straight-through); for JumpReLU's L0."""
    return _StepFn.apply(pre, theta, eps)
