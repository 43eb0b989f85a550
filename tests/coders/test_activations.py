"""Latent activations: values, derivative masks and the gradients they pass (checked independently)."""

from __future__ import annotations

import math

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder, build_coder
from mechfaith.coders import activations as acts


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- ReLU
def test_relu_values_mask_and_zero_convention() -> None:
    pre = torch.tensor([[-1.0, 0.0, 2.0, -0.0, 3.5]])
    f, mask = acts.relu(pre)
    assert torch.equal(f, torch.tensor([[0.0, 0.0, 2.0, 0.0, 3.5]]))
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[False, False, True, False, True]]  # ReLU'(0) = 0
    # autograd agrees on the convention at exactly 0
    p = pre.clone().requires_grad_(True)
    torch.relu(p).sum().backward()
    assert torch.equal(p.grad, mask.to(p.dtype))


def test_coder_jacobian_is_zero_where_pre_is_exactly_zero() -> None:
    coder = build_coder(CoderConfig(d_in=4, n_latents=6), seed=0).double()
    x = torch.zeros(3, 4, dtype=torch.double)  # b_enc = 0 -> every pre-activation is exactly 0
    jac = coder.jacobian(x)
    assert torch.equal(jac, torch.zeros_like(jac))
    ref = torch.func.vmap(torch.func.jacrev(coder))(x)
    assert torch.equal(ref, torch.zeros_like(ref))


# ---------------------------------------------------------------- TopK
@pytest.mark.parametrize("shift", [5.0, 0.0])
def test_topk_keeps_relu_of_k_largest(shift: float) -> None:
    k = 4
    pre = torch.randn(8, 20, generator=_gen(1), dtype=torch.double) + shift
    f, mask = acts.topk(pre, k)
    top_vals, top_idx = pre.topk(k, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top_idx, torch.relu(top_vals))
    assert torch.equal(f, expected)
    assert (f >= 0).all()
    assert torch.equal(mask, expected > 0)
    nonzero = (f != 0).sum(dim=-1)
    if shift > 0:  # all pre-activations positive: exactly k per row
        assert (nonzero == k).all()
        assert (mask.sum(dim=-1) == k).all()
    else:
        assert (nonzero <= k).all()
        assert torch.equal(nonzero, torch.relu(top_vals).gt(0).sum(dim=-1))


def test_topk_gradient_flows_only_through_kept_latents() -> None:
    pre = (torch.randn(5, 12, generator=_gen(2), dtype=torch.double) + 0.3).requires_grad_(True)
    f, mask = acts.topk(pre, 3)
    w = torch.randn(5, 12, generator=_gen(3), dtype=torch.double)
    (f * w).sum().backward()
    assert torch.equal(pre.grad, w * mask)


# ---------------------------------------------------------------- BatchTopK
def test_batchtopk_keeps_k_times_batch_over_the_batch() -> None:
    k, batch = 3, 6
    pre = torch.rand(batch, 10, generator=_gen(4), dtype=torch.double) + 0.1  # all positive
    pre[0] *= 10  # row 0 holds the largest values: it must get more than k latents
    f, mask = acts.batchtopk(pre, k)
    assert int(mask.sum()) == k * batch
    assert int((f != 0).sum()) == k * batch
    assert torch.equal(f, pre * mask)
    assert float(pre[mask].min()) >= float(pre[~mask].max())  # the largest ones were kept
    per_row = mask.sum(dim=-1)
    assert int(per_row[0]) > k  # not k per row: k per row on average
    assert int(per_row.sum()) == k * batch


def test_batchtopk_threshold_ema_and_inference() -> None:
    cfg = CoderConfig(d_in=6, n_latents=16, activation="batchtopk", k=3, batchtopk_momentum=0.25)
    coder = build_coder(cfg, seed=0).double()
    assert float(coder.batchtopk_threshold) == -1.0  # not set yet
    x1 = torch.randn(32, 6, generator=_gen(5), dtype=torch.double)
    x2 = torch.randn(32, 6, generator=_gen(6), dtype=torch.double)
    coder.train()
    out1 = coder.forward_full(x1)
    low1 = float(out1.f.detach()[out1.mask].min())
    assert float(coder.batchtopk_threshold) == pytest.approx(low1, rel=1e-12)
    out2 = coder.forward_full(x2)
    low2 = float(out2.f.detach()[out2.mask].min())
    assert float(coder.batchtopk_threshold) == pytest.approx(low1 + 0.25 * (low2 - low1), rel=1e-12)
    # inference: a fixed threshold, row by row
    coder.eval()
    theta = coder.batchtopk_threshold.clone()
    out3 = coder.forward_full(x1)
    pre = x1 @ coder.W_enc + coder.b_enc
    assert torch.equal(out3.f, pre * (pre > theta))
    assert torch.equal(out3.mask, pre > theta)
    assert torch.equal(coder.batchtopk_threshold, theta)  # eval does not move it
    # one row alone gives the same latents as in the batch (no batch coupling at inference)
    single = coder.forward_full(x1[3:4])
    assert torch.allclose(single.f, out3.f[3:4], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- JumpReLU
def _jumprelu_inputs() -> tuple[torch.Tensor, torch.Tensor, float]:
    eps = 0.1
    theta = torch.tensor([0.5, 1.0, 0.2], dtype=torch.double)
    # rows: far below, inside the kernel window (below and above), far above
    pre = torch.tensor([[0.1, 0.3, -1.0],
                        [0.47, 0.96, 0.23],
                        [0.53, 1.04, 0.17],
                        [2.0, 3.0, 1.5]], dtype=torch.double)
    return pre, theta, eps


def test_jumprelu_values() -> None:
    pre, theta, eps = _jumprelu_inputs()
    f, mask = acts.jumprelu(pre, theta, eps)
    assert torch.equal(f, pre * (pre > theta).to(pre.dtype))
    assert torch.equal(mask, pre > theta)
    assert f[1, 0] == 0 and f[2, 0] == pytest.approx(0.53)  # it jumps: no value between 0 and theta


def test_jumprelu_gradient_in_pre_matches_finite_differences() -> None:
    pre, theta, eps = _jumprelu_inputs()
    w = torch.randn(pre.shape, generator=_gen(7), dtype=torch.double)
    p = pre.clone().requires_grad_(True)
    f, _ = acts.jumprelu(p, theta, eps)
    (f * w).sum().backward()
    h = 1e-6
    fd = torch.zeros_like(pre)
    for idx in torch.cartesian_prod(torch.arange(pre.shape[0]), torch.arange(pre.shape[1])):
        i, j = int(idx[0]), int(idx[1])
        assert abs(float(pre[i, j] - theta[j])) > 10 * h  # smooth here
        up, down = pre.clone(), pre.clone()
        up[i, j] += h
        down[i, j] -= h
        fu = (acts.jumprelu(up, theta, eps)[0] * w).sum()
        fdn = (acts.jumprelu(down, theta, eps)[0] * w).sum()
        fd[i, j] = (fu - fdn) / (2 * h)
    assert torch.allclose(p.grad, fd, rtol=1e-6, atol=1e-8)
    assert torch.equal(p.grad, w * (pre > theta))


def test_jumprelu_straight_through_threshold_gradient() -> None:
    pre, theta, eps = _jumprelu_inputs()
    w = torch.randn(pre.shape, generator=_gen(8), dtype=torch.double)
    t = theta.clone().requires_grad_(True)
    f, _ = acts.jumprelu(pre, t, eps)
    (f * w).sum().backward()
    # Rajamanoharan et al. 2024: d f / d theta = -(theta / eps) K((pre - theta) / eps), K = 1[|u| < 1/2]
    kernel = ((pre - theta) / eps).abs().lt(0.5).to(pre.dtype)
    expected = (-(theta / eps) * kernel * w).sum(dim=0)
    assert torch.allclose(t.grad, expected, rtol=1e-12, atol=1e-12)
    assert (t.grad != 0).all()  # each latent has rows inside the window


def test_coder_log_threshold_gradient_and_l0_reach_the_threshold() -> None:
    cfg = CoderConfig(d_in=5, n_latents=7, activation="jumprelu", jumprelu_threshold=0.3,
                      jumprelu_bandwidth=0.5)
    coder = build_coder(cfg, seed=0).double()
    x = torch.randn(64, 5, generator=_gen(9), dtype=torch.double)
    out = coder.forward_full(x)
    theta = coder.threshold().detach()
    pre = out.pre.detach()
    kernel = ((pre - theta) / cfg.jumprelu_bandwidth).abs().lt(0.5).to(pre.dtype)
    assert kernel.sum() > 0
    g = torch.randn(out.f.shape, generator=_gen(10), dtype=torch.double)
    (out.f * g).sum().backward()
    expected_theta = (-(theta / cfg.jumprelu_bandwidth) * kernel * g).sum(dim=0)
    # chain rule through theta = exp(log_threshold)
    assert torch.allclose(coder.log_threshold.grad, expected_theta * theta, rtol=1e-10, atol=1e-12)
    # the L0 penalty's straight-through gradient: d H(pre - theta) / d theta = -(1/eps) K
    coder.zero_grad()
    out = coder.forward_full(x)
    from mechfaith.coders.penalties import sparsity_penalty
    l0 = sparsity_penalty("l0", coder, out)
    assert l0.item() == pytest.approx(float((pre > theta).sum(dim=-1).double().mean()))
    l0.backward()
    expected_l0 = (-kernel / cfg.jumprelu_bandwidth).sum(dim=0) / x.shape[0] * theta
    assert torch.allclose(coder.log_threshold.grad, expected_l0, rtol=1e-10, atol=1e-12)
    assert (coder.log_threshold.grad != 0).any()
    assert coder.W_enc.grad is None or torch.equal(coder.W_enc.grad, torch.zeros_like(coder.W_enc))


def test_jumprelu_forward_mode_is_exact_in_pre() -> None:
    pre, theta, eps = _jumprelu_inputs()
    tangent = torch.randn(pre.shape, generator=_gen(11), dtype=torch.double)
    _, jv = torch.func.jvp(lambda p: acts.jumprelu(p, theta, eps)[0], (pre,), (tangent,))
    assert torch.equal(jv, tangent * (pre > theta))


def test_step_function_values() -> None:
    pre, theta, eps = _jumprelu_inputs()
    assert torch.equal(acts.step(pre, theta, eps), (pre > theta).to(pre.dtype))
    assert math.isclose(float(acts.step(pre, theta, eps).sum()), float((pre > theta).sum()))


def test_threshold_activation() -> None:
    pre = torch.tensor([[0.1, 0.5, 0.2, -3.0]])
    f, mask = acts.threshold(pre, 0.2)
    assert torch.equal(f, torch.tensor([[0.0, 0.5, 0.0, 0.0]]))  # strict: pre == theta is off
    assert mask.tolist() == [[False, True, False, False]]


def test_sparse_coder_is_exported() -> None:
    assert issubclass(SparseCoder, torch.nn.Module)
