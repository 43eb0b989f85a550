"""Exact Jacobians, the probe estimator of the Jacobian error, and the gradient of the
Jacobian-matching term (it reaches the coder's parameters and nothing else)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mechfaith.coders import CoderConfig, SparseCoder, build_coder
from mechfaith.errors import InputError
from mechfaith.faithfulness.jacobian import exact_jacobians, frobenius_error_exact, jvp_error_estimate
from mechfaith.training.jacobian_matching import jacobian_matching

D, HIDDEN, LATENTS = 6, 10, 16


class GatedMLP(nn.Module):
    """Llama-style MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def make_mlp(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "relu":
        mlp = nn.Sequential(nn.Linear(D, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D))
    elif kind == "gelu":
        mlp = nn.Sequential(nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D))
    else:
        mlp = GatedMLP(D, HIDDEN)
    return mlp.double()


def make_coder(seed: int = 0, skip: bool = False) -> SparseCoder:
    coder = build_coder(CoderConfig(d_in=D, n_latents=LATENTS, skip=skip), seed=seed).double()
    with torch.no_grad():
        coder.b_enc.fill_(0.1)
    return coder


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.double)


KINDS = ["relu", "gelu", "gated_silu"]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_jacobians_match_autograd(kind: str) -> None:
    mlp = make_mlp(kind)
    x = inputs(5)
    jac = exact_jacobians(mlp, x)
    assert jac.shape == (5, D, D)
    for b in range(5):  # plain reverse-mode autograd, one input at a time
        ref = torch.autograd.functional.jacobian(lambda xi: mlp(xi.unsqueeze(0)).squeeze(0), x[b])
        assert torch.allclose(jac[b], ref, rtol=1e-10, atol=1e-12)
    # chunking changes nothing
    assert torch.allclose(exact_jacobians(mlp, x, chunk_size=2), jac, rtol=0, atol=1e-14)
    assert jac.abs().sum() > 0


def test_exact_jacobians_of_a_coder_match_closed_form() -> None:
    coder = make_coder(skip=True)
    with torch.no_grad():
        coder.W_skip.normal_()
    x = inputs(7)
    assert torch.allclose(exact_jacobians(coder, x), coder.jacobian(x), atol=1e-12)


def test_exact_jacobians_input_errors() -> None:
    mlp = make_mlp("relu")
    with pytest.raises(InputError, match=r"expected \[batch, d_in\]"):
        exact_jacobians(mlp, torch.zeros(D, dtype=torch.double))
    with pytest.raises(InputError, match="floating-point"):
        exact_jacobians(mlp, torch.zeros(2, D, dtype=torch.long))
    with pytest.raises(InputError, match="chunk_size"):
        exact_jacobians(mlp, inputs(2), chunk_size=0)


@pytest.mark.parametrize("kind", KINDS)
def test_frobenius_error_exact_matches_manual(kind: str) -> None:
    mlp, coder = make_mlp(kind), make_coder()
    x = inputs(9)
    got = frobenius_error_exact(mlp, coder, x)
    manual = 0.0
    for b in range(9):
        j_ref = torch.autograd.functional.jacobian(lambda xi: mlp(xi.unsqueeze(0)).squeeze(0), x[b])
        j_tc = torch.autograd.functional.jacobian(lambda xi: coder(xi.unsqueeze(0)).squeeze(0), x[b])
        manual += float(((j_ref - j_tc) ** 2).sum())
    assert got.item() == pytest.approx(manual / 9, rel=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_jvp_estimate_agrees_with_exact_frobenius(kind: str) -> None:
    mlp, coder = make_mlp(kind), make_coder()
    x = inputs(16, seed=2)
    exact = frobenius_error_exact(mlp, coder, x).item()
    ref_exact = exact_jacobians(mlp, x).pow(2).sum(dim=(1, 2)).mean().item()
    est = jvp_error_estimate(mlp, coder, x, n_probes=3000, generator=torch.Generator().manual_seed(3))
    assert est.n_inputs == 16 and est.n_probes == 3000
    assert abs(est.sq_error - exact) / exact < 0.05
    assert abs(est.ref_sq - ref_exact) / ref_exact < 0.05
    assert est.rel_error == pytest.approx(est.sq_error / est.ref_sq, rel=1e-12)
    assert abs(est.rel_error - exact / ref_exact) / (exact / ref_exact) < 0.05
    assert 0 < est.sq_error_se < 0.5 * est.sq_error
    assert 0 < est.rel_error_se < 0.5 * est.rel_error


def test_jvp_estimate_is_zero_for_a_perfect_coder() -> None:
    coder = make_coder()
    est = jvp_error_estimate(coder, coder, inputs(8), n_probes=4)
    assert est.sq_error == 0.0 and est.rel_error == 0.0 and est.ref_sq > 0


def test_jvp_estimate_errors() -> None:
    mlp, coder = make_mlp("relu"), make_coder()
    with pytest.raises(InputError, match="n_probes"):
        jvp_error_estimate(mlp, coder, inputs(4), n_probes=0)
    narrow = nn.Linear(D, D - 1).double()
    with pytest.raises(InputError, match="do not map the same spaces"):
        jvp_error_estimate(narrow, coder, inputs(4), n_probes=1)


@pytest.mark.parametrize("kind", KINDS)
def test_jacobian_matching_gradient_reaches_only_the_coder(kind: str) -> None:
    mlp, coder = make_mlp(kind), make_coder(skip=True)
    for p in mlp.parameters():
        assert p.requires_grad  # the reference's parameters could receive a gradient, but must not
    x = inputs(32).requires_grad_(True)
    jm = jacobian_matching(coder, mlp, x, n_probes=2, generator=torch.Generator().manual_seed(0))
    assert jm.loss.requires_grad
    jm.loss.backward()
    for name in ("W_enc", "W_dec", "W_skip"):
        g = getattr(coder, name).grad
        assert g is not None and g.abs().sum() > 0, name
    for name, p in mlp.named_parameters():
        assert p.grad is None, name
    assert x.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_jvp_term_gradient_with_basis_probes_equals_exact_frobenius_gradient(kind: str) -> None:
    """With the d basis vectors as probes, sum_j ||(J_ref - J_tc) e_j||^2 = ||J_ref - J_tc||_F^2
    exactly, so the two gradients must agree to rounding."""
    mlp, coder = make_mlp(kind), make_coder()
    x = inputs(12)
    basis = torch.eye(D, dtype=torch.double).unsqueeze(1).expand(D, 12, D).contiguous()
    jm = jacobian_matching(coder, mlp, x, v=basis)
    (jm.loss * D).backward()  # the term is a mean over probes; the Frobenius norm sums them
    g_jvp = [coder.W_enc.grad.clone(), coder.W_dec.grad.clone()]
    coder.zero_grad()
    frobenius_error_exact(mlp, coder, x).backward()
    for a, p in zip(g_jvp, (coder.W_enc, coder.W_dec)):
        assert p.grad.abs().sum() > 0
        assert torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_jvp_term_gradient_is_unbiased(kind: str) -> None:
    """Averaged over many Gaussian probes, the JVP term's gradient approaches the exact one."""
    mlp, coder = make_mlp(kind), make_coder()
    x = inputs(8, seed=4)
    frobenius_error_exact(mlp, coder, x).backward()
    exact = torch.cat([coder.W_enc.grad.flatten(), coder.W_dec.grad.flatten()])
    coder.zero_grad()
    g = torch.Generator().manual_seed(5)
    # 4000 probes per input, as one batch of the inputs repeated (one probe per row): same mean
    jm = jacobian_matching(coder, mlp, x.repeat(4000, 1), n_probes=1, generator=g)
    jm.loss.backward()
    est = torch.cat([coder.W_enc.grad.flatten(), coder.W_dec.grad.flatten()])
    rel = float((est - exact).norm() / exact.norm())
    assert rel < 0.1, rel
    cos = float(torch.nn.functional.cosine_similarity(est, exact, dim=0))
    assert cos > 0.99, cos


# ---------------------------------------------------------------- fast reference JVP
@pytest.mark.parametrize("kind", KINDS)
def test_linear_jvp_mode_matches_torch_func_jvp(kind: str) -> None:
    from mechfaith.training.fast_jvp import linear_jvp_mode

    mlp = make_mlp(kind)
    x, v = inputs(9, seed=20), inputs(9, seed=21)
    with torch.no_grad():
        y_ref, jv_ref = torch.func.jvp(mlp, (x,), (v,))
        with linear_jvp_mode():
            y, jv = torch.func.jvp(mlp, (x,), (v,))
            # weights that carry tangents themselves fall through to the exact rule
            params = {k: p.detach() for k, p in mlp.named_parameters()}
            tangents = {k: torch.ones_like(p) for k, p in params.items()}
            _, jw = torch.func.jvp(lambda p: torch.func.functional_call(mlp, p, (x,)),
                                   (params,), (tangents,))
        _, jw_ref = torch.func.jvp(lambda p: torch.func.functional_call(mlp, p, (x,)),
                                   (params,), (tangents,))
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(jv, jv_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(jw, jw_ref, rtol=1e-10, atol=1e-12) and jw.abs().sum() > 0
    # with gradients on, nn.Linear is left alone (reverse mode still works)
    with linear_jvp_mode():
        xr = x.clone().requires_grad_(True)
        mlp(xr).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0


def test_linear_jvp_mode_skips_the_weight_tangent_matmul() -> None:
    from torch.profiler import profile

    from mechfaith.training.fast_jvp import linear_jvp_mode

    mlp = make_mlp("gelu")
    x, v = inputs(4), inputs(4, seed=3)

    def count_mm(fast: bool) -> int:
        with torch.no_grad(), profile() as prof:
            if fast:
                with linear_jvp_mode():
                    torch.func.jvp(mlp, (x,), (v,))
            else:
                torch.func.jvp(mlp, (x,), (v,))
        return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")

    assert count_mm(True) == 2  # one tangent product per layer
    assert count_mm(False) > count_mm(True)
