"""Stacked coders (training.stack, stack_losses, stack_trainer) on the toy's grid: each member's loss
and gradients equal the single-coder computation (core penalties + core Jacobian matching), the
Jacobian term's gradient reaches the coder, export, resampling, and the toy's grid trains."""

from __future__ import annotations

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder, jacobian_contribution_penalty, sparsity_penalty
from mechfaith.errors import ConfigError
from mechfaith.toy.batched import MemberSpec, member_settings
from mechfaith.toy.data import datapoint, sample_with_repeats
from mechfaith.toy.model import AbsMLP
from mechfaith.toy.train import train_grid
from mechfaith.training.config import TrainConfig
from mechfaith.training.jacobian_matching import jacobian_matching
from mechfaith.training.schedules import lr_at
from mechfaith.training.stack import CoderStack
from mechfaith.training.stack_losses import stack_losses
from mechfaith.training.stack_trainer import resample_dead_

D, N, B = 6, 14, 64
SPECS = [
    MemberSpec("a", 0, 0.0, "tanh_l1", 0.2),
    MemberSpec("b", 1, 0.1, "l1", 0.3, jacobian_coef=0.7),
    MemberSpec("c", 2, 0.5, "tanh_l1", 0.1, jacobian_coef=1.5, jac_contrib_coef=0.05),
    MemberSpec("d", 3, 0.2, "tanh_l1", 0.0, jac_contrib_coef=0.2),
]


REPEAT = torch.tensor([s.repeat_frac for s in SPECS], dtype=torch.float64)


def _grid(dtype=torch.float64):
    cfg = CoderConfig(d_in=D, n_latents=N)
    coder = CoderStack.initialised([cfg] * len(SPECS), [s.seed for s in SPECS])
    with torch.no_grad():  # move away from the tied init so every term is generic
        gen = torch.Generator().manual_seed(9)
        for prm in coder.parameters():
            prm.add_(0.1 * torch.randn(prm.shape, generator=gen))
    return coder.to(dtype)


def _reference_loss(coder: SparseCoder, mlp, x, v, spec: MemberSpec, c: float) -> torch.Tensor:
    """One member, computed with the core single-coder functions (the slow path)."""
    jm = jacobian_matching(coder, mlp, x, v=v)
    out = jm.out
    mse = (out.y_hat - mlp(x)).pow(2).sum(-1).mean()
    pen = sparsity_penalty(spec.penalty, coder, out, c)
    total = mse + spec.sparsity_coef * pen
    if spec.jacobian_coef:
        total = total + spec.jacobian_coef * jm.loss
    if spec.jac_contrib_coef:
        total = total + spec.jac_contrib_coef * jacobian_contribution_penalty(coder, out)
    return total


def test_member_loss_and_gradients_match_single_coder_reference():
    mlp = AbsMLP(D).double()
    coder = _grid()
    hyper = member_settings(SPECS, tanh_c=3.0)
    assert coder.W_enc.dtype == torch.float64
    gen = torch.Generator().manual_seed(0)
    x = sample_with_repeats(len(SPECS), B, D, 0.5, REPEAT, datapoint(D).double(), gen)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    terms = stack_losses(coder, x, hyper, mlp, v)
    terms.total.sum().backward()
    for g, spec in enumerate(SPECS):
        single = coder.member_coder(g).double()
        ref = _reference_loss(single, mlp, x[g], v[g], spec, 3.0)
        ref.backward()
        assert float(terms.total[g]) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(coder, name).grad[g], getattr(single, name).grad,
                                       rtol=1e-9, atol=1e-12)


def test_several_probes_average_like_the_core_estimator():
    mlp = AbsMLP(D).double()
    coder = _grid()
    hyper = member_settings(SPECS)
    gen = torch.Generator().manual_seed(1)
    x = sample_with_repeats(len(SPECS), B, D, 0.5, REPEAT, datapoint(D).double(), gen)
    v = torch.randn((3, *x.shape), generator=gen, dtype=x.dtype)
    terms = stack_losses(coder, x, hyper, mlp, v)
    for g in (1, 2):
        jm = jacobian_matching(coder.member_coder(g).double(), mlp, x[g], v=v[:, g])
        assert float(terms.jacobian[g]) == pytest.approx(float(jm.loss), rel=1e-10)
    assert float(terms.jacobian[0]) == 0.0  # members without the term do not compute it


def test_jacobian_term_gradient_reaches_coder_parameters():
    mlp = AbsMLP(D)
    coder = _grid(torch.float32)
    specs = [MemberSpec("j", 0, 0.1, "tanh_l1", 0.0, jacobian_coef=1.0)] * 4
    hyper = member_settings(specs)
    gen = torch.Generator().manual_seed(2)
    x = sample_with_repeats(4, B, D, 0.5, torch.tensor([s.repeat_frac for s in specs]), datapoint(D), gen)
    v = torch.randn(x.shape, generator=gen)
    terms = stack_losses(coder, x, hyper, mlp, v)
    assert float(terms.jacobian.min()) > 0
    grads = torch.autograd.grad(terms.jacobian.sum(), [coder.W_enc, coder.W_dec])
    for g in grads:
        assert float(g.abs().sum()) > 0
    # and the reference MLP gets none
    assert all(not prm.requires_grad for prm in mlp.parameters())
    # a step on the Jacobian term alone lowers it
    with torch.no_grad():
        coder.W_enc -= 0.05 * grads[0]
        coder.W_dec -= 0.05 * grads[1]
    after = stack_losses(coder, x, hyper, mlp, v).jacobian.sum()
    assert float(after) < float(terms.jacobian.sum())


def test_jacobian_term_needs_probes():
    coder = _grid(torch.float32)
    hyper = member_settings(SPECS)
    x = torch.zeros(len(SPECS), 4, D)
    with pytest.raises(ConfigError):
        stack_losses(coder, x, hyper, AbsMLP(D), None)


def test_initialisation_and_export_round_trip():
    cfg = CoderConfig(d_in=D, n_latents=N)
    coder = CoderStack.initialised([cfg, cfg], [5, 7])
    single = SparseCoder(cfg, generator=torch.Generator().manual_seed(7))
    exported = coder.member_coder(1)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(exported, name), getattr(single, name))
    x = torch.randn(2, 9, D)
    y_hat, f, _ = coder.forward_dense(x)
    torch.testing.assert_close(y_hat[1], exported(x[1]))
    torch.testing.assert_close(f[1], exported.encode(x[1]))
    again = CoderStack.from_coders([coder.member_coder(0), exported])
    torch.testing.assert_close(again.W_dec, coder.W_dec)
    with pytest.raises(ConfigError):
        CoderStack.from_coders([SparseCoder(CoderConfig(d_in=D, n_latents=N, activation="jumprelu"))])
    with pytest.raises(ConfigError, match="share"):
        CoderStack.from_coders([exported, SparseCoder(CoderConfig(d_in=D, n_latents=N, activation="topk", k=2))])
    with pytest.raises(IndexError):
        coder.member_coder(2)


def test_member_spec_validation():
    with pytest.raises(ConfigError):
        MemberSpec("x", 0, penalty="l0")
    with pytest.raises(ConfigError):
        MemberSpec("x", 0, repeat_frac=1.5)
    with pytest.raises(ConfigError):
        MemberSpec("x", 0, jacobian_coef=-1)


def test_lr_schedule_is_the_toy_regime_bit_for_bit():
    """The toy's own schedule before the engine (warm-up, then cosine to 0 over the last 20%),
    written out: the TrainConfig schedule must give the same floats, so the toy's numbers stay."""
    import math

    def toy_lr(step: int, steps: int, lr: float, warmup: int, decay_frac: float) -> float:
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        start = int(steps * (1 - decay_frac))
        if step < start:
            return lr
        u = (step - start) / max(1, steps - start)
        return lr * 0.5 * (1 + math.cos(math.pi * u))

    for steps in (1200, 3000):
        cfg = TrainConfig(n_steps=steps, lr=3e-3, lr_warmup_steps=100, lr_decay="cosine", lr_decay_frac=0.2)
        assert [lr_at(s, cfg) for s in range(steps)] == [toy_lr(s, steps, 3e-3, 100, 0.2) for s in range(steps)]


def test_resample_dead_reinitialises_only_dead_latents():
    coder = _grid(torch.float32)
    before = {k: v.detach().clone() for k, v in coder.named_parameters()}
    opt = torch.optim.Adam(coder.parameters())
    dead = torch.zeros(len(SPECS), N, dtype=torch.bool)
    dead[1, 3] = True
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(SPECS), 8, D, generator=gen)
    counts = resample_dead_(coder, opt, dead, x, torch.randn(len(SPECS), 8, D, generator=gen), gen)
    assert counts.tolist() == [0, 1, 0, 0]
    changed = (coder.W_dec.detach() != before["W_dec"]).any(-1)
    assert changed.nonzero().tolist() == [[1, 3]]
    torch.testing.assert_close(coder.W_dec[1, 3].norm(), torch.tensor(1.0))
    assert float(coder.b_enc[1, 3]) == 0.0


def test_train_grid_learns_abs_and_stays_finite():
    mlp = AbsMLP(4)
    p = datapoint(4, 2)
    specs = [MemberSpec("a", 0, 0.0, "tanh_l1", 0.02), MemberSpec("b", 1, 0.05, "tanh_l1", 0.02, 0.5)]
    res = train_grid(specs, mlp, p, n_latents=10, density=0.3, steps=300, batch=128, lr=1e-2,
                     progress=False)
    assert len(res.final_losses["mse"]) == 2
    # the variance of |x| summed over 4 dims at density 0.3 is about 0.31; training must beat it
    assert max(res.final_losses["mse"]) < 0.2
    assert res.final_losses["jacobian"][0] == 0.0 and res.final_losses["jacobian"][1] > 0
