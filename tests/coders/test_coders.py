"""The sparse coder: penalties against manual sums, the closed-form JVP and Jacobian against
torch.func, configuration and input errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from mechfaith.coders import (
    ACTIVATIONS,
    CoderConfig,
    SparseCoder,
    build_coder,
    jacobian_contribution_penalty,
    sparsity_penalty,
)
from mechfaith.errors import ConfigError, InputError

D_IN, N_LAT, D_OUT, BATCH = 5, 12, 4, 7


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_coder(activation: str, skip: bool = False, *, d_out: int = D_OUT, seed: int = 0,
               ready: bool = True) -> SparseCoder:
    """A float64 coder with random (non-unit) decoder rows, biases and skip; BatchTopK in eval
    mode with its threshold set (``ready``), so that the coder is a function of each row."""
    cfg = CoderConfig(d_in=D_IN, n_latents=N_LAT, d_out=d_out, activation=activation, k=3,
                      skip=skip, jumprelu_threshold=0.05, init_scale=1.0)
    coder = build_coder(cfg, seed=seed).double()
    g = _gen(seed + 100)
    with torch.no_grad():
        coder.W_dec.mul_(torch.rand(N_LAT, 1, generator=g, dtype=torch.double) * 2 + 0.2)
        coder.W_enc.mul_(1.5)
        coder.b_enc.copy_(torch.randn(N_LAT, generator=g, dtype=torch.double) * 0.3)
        coder.b_dec.copy_(torch.randn(d_out, generator=g, dtype=torch.double))
        if skip:
            coder.W_skip.copy_(torch.randn(D_IN, d_out, generator=g, dtype=torch.double) * 0.5)
    if activation == "batchtopk" and ready:
        coder.train()
        coder.forward_full(torch.randn(64, D_IN, generator=g, dtype=torch.double))
        coder.eval()
    return coder


def inputs(seed: int = 1, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, D_IN, generator=_gen(seed), dtype=torch.double)


CASES = list(itertools.product(ACTIVATIONS, [False, True]))


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("activation,skip", CASES)
def test_forward_matches_manual_formula(activation: str, skip: bool) -> None:
    coder = make_coder(activation, skip)
    x = inputs()
    out = coder.forward_full(x)
    pre = x @ coder.W_enc + coder.b_enc
    assert torch.allclose(out.pre, pre, atol=1e-12)
    y = out.f @ coder.W_dec + coder.b_dec + (x @ coder.W_skip if skip else 0)
    assert torch.allclose(out.y_hat, y, atol=1e-12)
    assert torch.allclose(coder(x), y, atol=1e-12)
    assert torch.allclose(coder(x.reshape(1, BATCH, D_IN)), y.reshape(1, BATCH, D_OUT), atol=1e-12)
    assert out.mask.dtype == torch.bool and (out.f[~out.mask] == 0).all()


# ---------------------------------------------------------------- penalties
def test_penalties_match_manual_sums() -> None:
    coder = make_coder("relu")
    x = inputs()
    out = coder.forward_full(x)
    f = out.f.detach()
    norms = torch.stack([torch.sqrt(sum(coder.W_dec[i, j] ** 2 for j in range(D_OUT)))
                         for i in range(N_LAT)]).detach()
    assert norms.std() > 0.1  # the decoder norms differ, so a missing factor would show
    l1 = sum(f[b, i] * norms[i] for b in range(BATCH) for i in range(N_LAT)) / BATCH
    assert sparsity_penalty("l1", coder, out).item() == pytest.approx(float(l1), rel=1e-12)
    c = 2.5
    th = sum(torch.tanh(c * f[b, i] * norms[i]) for b in range(BATCH) for i in range(N_LAT)) / BATCH
    assert sparsity_penalty("tanh_l1", coder, out, c).item() == pytest.approx(float(th), rel=1e-12)
    assert sparsity_penalty("none", coder, out).item() == 0.0
    enc_norms = coder.W_enc.detach().norm(dim=0)
    jc = sum(float(out.pre[b, i] > 0) * enc_norms[i] * norms[i]
             for b in range(BATCH) for i in range(N_LAT)) / BATCH
    assert jacobian_contribution_penalty(coder, out).item() == pytest.approx(float(jc), rel=1e-12)


def test_l0_penalty_counts_active_latents() -> None:
    coder = make_coder("jumprelu")
    x = inputs()
    out = coder.forward_full(x)
    expected = (out.pre.detach() > coder.threshold().detach()).sum() / BATCH
    assert sparsity_penalty("l0", coder, out).item() == pytest.approx(float(expected), rel=1e-12)


def test_penalty_gradients_match_autograd_of_manual_formula() -> None:
    coder = make_coder("relu")
    x = inputs()
    for name, manual in [
        ("l1", lambda o: (o.f * coder.W_dec.norm(dim=1)).sum(dim=1).mean()),
        ("tanh_l1", lambda o: torch.tanh(4.0 * o.f * coder.W_dec.norm(dim=1)).sum(dim=1).mean()),
    ]:
        coder.zero_grad()
        sparsity_penalty(name, coder, coder.forward_full(x), 4.0).backward()
        got = [p.grad.clone() for p in (coder.W_enc, coder.W_dec)]
        coder.zero_grad()
        manual(coder.forward_full(x)).backward()
        for g, p in zip(got, (coder.W_enc, coder.W_dec)):
            assert torch.allclose(g, p.grad, atol=1e-12)
            assert g.abs().sum() > 0
    # the Jacobian-contribution penalty's gradient reaches the weights only
    coder.zero_grad()
    xr = x.clone().requires_grad_(True)
    jacobian_contribution_penalty(coder, coder.forward_full(xr)).backward()
    assert coder.W_enc.grad.abs().sum() > 0 and coder.W_dec.grad.abs().sum() > 0
    assert xr.grad is None and (coder.b_enc.grad is None or torch.equal(coder.b_enc.grad,
                                                                          torch.zeros_like(coder.b_enc)))


def test_penalty_errors() -> None:
    coder = make_coder("relu")
    out = coder.forward_full(inputs())
    with pytest.raises(ConfigError, match="unknown sparsity penalty 'l2'"):
        sparsity_penalty("l2", coder, out)
    with pytest.raises(ConfigError, match="JumpReLU"):
        sparsity_penalty("l0", coder, out)


# ---------------------------------------------------------------- JVP and Jacobian
def _reference_jvp(coder: SparseCoder, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.func.jvp(coder, (x,), (v,))[1]


@pytest.mark.parametrize("activation,skip", CASES)
def test_forward_with_jvp_matches_torch_func_jvp(activation: str, skip: bool) -> None:
    coder = make_coder(activation, skip)
    x = inputs(2)
    v = torch.randn(BATCH, D_IN, generator=_gen(3), dtype=torch.double)
    out, jv = coder.forward_with_jvp(x, v)
    ref = _reference_jvp(coder, x, v)
    assert jv.shape == (BATCH, D_OUT)
    assert torch.allclose(jv, ref, rtol=1e-10, atol=1e-12)
    assert jv.abs().sum() > 0
    assert torch.allclose(out.y_hat, coder(x), atol=1e-12)
    # several probes at once: [probes, batch, d_in] -> [probes, batch, d_out]
    vs = torch.randn(3, BATCH, D_IN, generator=_gen(4), dtype=torch.double)
    _, jvs = coder.forward_with_jvp(x, vs)
    assert jvs.shape == (3, BATCH, D_OUT)
    for p in range(3):
        assert torch.allclose(jvs[p], _reference_jvp(coder, x, vs[p]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation,skip", CASES)
def test_jacobian_matches_jacrev(activation: str, skip: bool) -> None:
    coder = make_coder(activation, skip)
    x = inputs(5)
    jac = coder.jacobian(x)
    ref = torch.func.vmap(torch.func.jacrev(coder))(x)
    assert jac.shape == (BATCH, D_OUT, D_IN)
    assert torch.allclose(jac, ref, rtol=1e-10, atol=1e-12)
    assert jac.abs().sum() > 0


@pytest.mark.parametrize("skip", [False, True])
def test_batchtopk_training_mode_jvp_matches_autograd(skip: bool) -> None:
    """In training mode BatchTopK couples the rows; its Jacobian (per row, the selection held fixed)
    is checked against plain reverse-mode autograd through the bilinear identity w.(J v) = (J^T w).v."""
    coder = make_coder("batchtopk", skip, ready=False)
    coder.train()
    x = inputs(6, batch=16)
    v = torch.randn(16, D_IN, generator=_gen(7), dtype=torch.double)
    w = torch.randn(16, D_OUT, generator=_gen(8), dtype=torch.double)
    _, jv = coder.forward_with_jvp(x, v)
    xr = x.clone().requires_grad_(True)
    (coder(xr) * w).sum().backward()
    assert (w * jv).sum().item() == pytest.approx(float((xr.grad * v).sum()), rel=1e-10)
    # and the closed-form Jacobian row by row against full reverse-mode Jacobian's diagonal blocks
    full = torch.autograd.functional.jacobian(coder, x)  # [batch, d_out, batch, d_in]
    diag = torch.einsum("bobi->boi", full)
    assert torch.allclose(coder.jacobian(x), diag, atol=1e-12)
    off = full.clone()
    for b in range(16):
        off[b, :, b, :] = 0
    assert torch.equal(off, torch.zeros_like(off))  # selection is locally constant


def test_jvp_gradient_reaches_coder_parameters() -> None:
    coder = make_coder("relu", skip=True)
    x, v = inputs(9), torch.randn(BATCH, D_IN, generator=_gen(10), dtype=torch.double)
    _, jv = coder.forward_with_jvp(x, v)
    jv.pow(2).sum().backward()
    for name in ("W_enc", "W_dec", "W_skip"):
        assert getattr(coder, name).grad.abs().sum() > 0, name
    # the biases enter J v only through the mask: no gradient
    for name in ("b_enc", "b_dec"):
        g = getattr(coder, name).grad
        assert g is None or torch.equal(g, torch.zeros_like(g)), name


# ---------------------------------------------------------------- fused path vs plain autograd
FUSED_CASES = [(a, s, p) for a in ACTIVATIONS if a != "jumprelu" for s in (False, True)
               for p in (0, 1, 3)]


def _run(coder: SparseCoder, x: torch.Tensor, v: torch.Tensor | None, y: torch.Tensor,
         w_pre: torch.Tensor, ref_jv: torch.Tensor | None):
    """Every output and every gradient of a loss that uses y_hat, f (penalty), pre and J v."""
    xr = x.clone().requires_grad_(True)
    if v is None:
        out, jv = coder.forward_full(xr), None
    else:
        out, jv = coder.forward_with_jvp(xr, v)
    loss = (out.y_hat - y).square().sum() + 0.3 * (out.f @ coder.decoder_norms()).sum()
    loss = loss + (out.pre * w_pre).sum()  # a gradient into pre (as AuxK gives)
    if jv is not None:
        loss = loss + 0.7 * (jv - ref_jv).square().sum()
    coder.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}
    grads["x"] = xr.grad.clone()
    values = [out.y_hat, out.f, out.pre, out.mask] + ([jv] if jv is not None else [])
    return [t.detach().clone() for t in values], grads


@pytest.mark.parametrize("activation,skip,probes", FUSED_CASES)
def test_fused_path_matches_plain_autograd(activation: str, skip: bool, probes: int) -> None:
    coder = make_coder(activation, skip)
    coder.train()  # BatchTopK: batch selection (its threshold moves; reset it between the runs)
    x = inputs(12)
    g = _gen(13)
    y = torch.randn(BATCH, D_OUT, generator=g, dtype=torch.double)
    w_pre = torch.randn(BATCH, N_LAT, generator=g, dtype=torch.double)
    v = ref_jv = None
    if probes == 1:
        v = torch.randn(BATCH, D_IN, generator=g, dtype=torch.double)
        ref_jv = torch.randn(BATCH, D_OUT, generator=g, dtype=torch.double)
    elif probes > 1:
        v = torch.randn(probes, BATCH, D_IN, generator=g, dtype=torch.double)
        ref_jv = torch.randn(probes, BATCH, D_OUT, generator=g, dtype=torch.double)
    thr = coder.batchtopk_threshold.clone()
    assert coder.fused
    fused_vals, fused_grads = _run(coder, x, v, y, w_pre, ref_jv)
    thr_fused = coder.batchtopk_threshold.clone()
    coder.batchtopk_threshold.copy_(thr)
    coder.fused = False
    plain_vals, plain_grads = _run(coder, x, v, y, w_pre, ref_jv)
    assert torch.equal(coder.batchtopk_threshold, thr_fused)
    for a, b in zip(fused_vals, plain_vals):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert set(plain_grads) <= set(fused_grads)
    for name, gp in plain_grads.items():
        assert torch.allclose(fused_grads[name], gp, rtol=1e-10, atol=1e-12), name
        assert gp.abs().sum() > 0, name
    for name in set(fused_grads) - set(plain_grads):  # only zeros where autograd gives none
        assert torch.equal(fused_grads[name], torch.zeros_like(fused_grads[name])), name


def test_fused_path_with_unused_outputs() -> None:
    """Gradients arrive for only some outputs (e.g. only J v): the others count as zero."""
    coder = make_coder("relu", skip=True)
    x, v = inputs(14), torch.randn(BATCH, D_IN, generator=_gen(15), dtype=torch.double)
    results = []
    for fused in (True, False):
        coder.fused = fused
        coder.zero_grad()
        _, jv = coder.forward_with_jvp(x, v)
        jv.square().sum().backward()
        results.append([coder.W_enc.grad.clone(), coder.W_dec.grad.clone(), coder.W_skip.grad.clone()])
        coder.zero_grad()
        coder.forward_full(x).f.sum().backward()
        results[-1].append(coder.W_enc.grad.clone())
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_fused_path_tangent_and_input_gradients() -> None:
    """Gradients to x and v (when they require one) match plain autograd; only J v used -> x gets none."""
    coder = make_coder("topk", skip=True)
    x0, v0 = inputs(16), torch.randn(2, BATCH, D_IN, generator=_gen(17), dtype=torch.double)
    w = torch.randn(2, BATCH, D_OUT, generator=_gen(18), dtype=torch.double)
    got = []
    for fused in (True, False):
        coder.fused = fused
        x, v = x0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
        out, jv = coder.forward_with_jvp(x, v)
        ((jv * w).sum() + out.y_hat.square().sum()).backward()
        got.append((x.grad.clone(), v.grad.clone()))
        x, v = x0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
        _, jv = coder.forward_with_jvp(x, v)
        (jv * w).sum().backward()
        assert x.grad is None or torch.equal(x.grad, torch.zeros_like(x.grad))
        assert v.grad is not None and v.grad.abs().sum() > 0
    for a, b in zip(got[0], got[1]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        assert a.abs().sum() > 0


# ---------------------------------------------------------------- decoder norm helpers
def test_decoder_norm_helpers() -> None:
    coder = make_coder("relu")
    coder.W_dec.grad = torch.randn(N_LAT, D_OUT, generator=_gen(11), dtype=torch.double)
    coder.normalize_decoder_()
    assert torch.allclose(coder.decoder_norms(), torch.ones(N_LAT, dtype=torch.double), atol=1e-12)
    coder.remove_parallel_decoder_grad_()
    assert torch.allclose((coder.W_dec.grad * coder.W_dec).sum(dim=1),
                          torch.zeros(N_LAT, dtype=torch.double), atol=1e-12)


# ---------------------------------------------------------------- errors
def test_input_errors() -> None:
    coder = make_coder("relu")
    with pytest.raises(InputError, match=r"shape \(3, 6\).*expected \[\.\.\., 5\]"):
        coder(torch.zeros(3, 6, dtype=torch.double))
    with pytest.raises(InputError, match="floating-point.*torch.int64"):
        coder(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(InputError, match="must be a torch.Tensor, got list"):
        coder([[0.0] * 5])
    with pytest.raises(InputError, match="expected"):
        coder.jacobian(torch.zeros(2, 4, dtype=torch.double))
    x = inputs()
    with pytest.raises(InputError, match=r"tangent v has shape \(7, 4\)"):
        coder.forward_with_jvp(x, torch.zeros(7, 4, dtype=torch.double))
    with pytest.raises(InputError, match=r"tangent v has shape \(2, 6, 5\)"):
        coder.forward_with_jvp(x, torch.zeros(2, 6, 5, dtype=torch.double))
    with pytest.raises(InputError, match="tangent v has dtype torch.float32"):
        coder.forward_with_jvp(x, torch.zeros(7, 5))
    with pytest.raises(InputError, match=r"expected \[batch, 5\] \(2-D\)"):
        coder.forward_with_jvp(x.reshape(1, 7, 5), x.reshape(1, 7, 5))
    for exc in (InputError,):
        try:
            coder(torch.zeros(3, 6, dtype=torch.double))
        except exc as e:
            assert "\n" not in str(e)


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_in=0, n_latents=4), "d_in must be a positive integer"),
    (dict(d_in=4, n_latents=4, k=5, activation="topk"), "k = 5 exceeds n_latents = 4"),
    (dict(d_in=4, n_latents=8, d_out=3, kind="sae"), "an SAE has d_out == d_in"),
    (dict(d_in=4, n_latents=8, activation="gelu"), "activation 'gelu'"),
    (dict(d_in=4, n_latents=8, jumprelu_bandwidth=0.0), "must be > 0"),
])
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CoderConfig(**kwargs)


def test_build_coder_is_deterministic_and_initialised() -> None:
    cfg = CoderConfig(d_in=6, n_latents=10)
    a, b = build_coder(cfg, seed=3), build_coder(cfg, seed=3)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    assert torch.allclose(a.decoder_norms(), torch.ones(10))
    assert torch.allclose(a.W_enc, a.W_dec.T)  # tied initialisation when d_in == d_out
    c = build_coder(cfg, seed=4)
    assert not torch.equal(a.W_dec, c.W_dec)
