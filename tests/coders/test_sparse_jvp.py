"""The sparse tangent path of TopK/BatchTopK coders (coders.sparse_jvp): values and every gradient
against the dense paths (fused and plain autograd) and against torch.func.jvp of the coder."""

from __future__ import annotations

import itertools

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder, build_coder
from mechfaith.coders.sparse_jvp import mask_pattern, sparse_jvp, transpose_pattern

D_IN, N_LAT, D_OUT, BATCH, K = 5, 12, 4, 7, 3
TOL = dict(rtol=1e-10, atol=1e-12)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_coder(activation: str, skip: bool, *, mode: str = "eval", seed: int = 0) -> SparseCoder:
    """A float64 transcoder (d_in != d_out) with random weights, biases and skip. BatchTopK: in
    ``mode`` "train" (batch selection) or "eval" (its threshold set from a first batch)."""
    cfg = CoderConfig(d_in=D_IN, n_latents=N_LAT, d_out=D_OUT, activation=activation, k=K, skip=skip)
    coder = build_coder(cfg, seed=seed).double()
    g = _gen(seed + 100)
    with torch.no_grad():
        coder.W_dec.mul_(torch.rand(N_LAT, 1, generator=g, dtype=torch.double) * 2 + 0.2)
        coder.W_enc.mul_(1.5)
        coder.b_enc.copy_(torch.randn(N_LAT, generator=g, dtype=torch.double) * 0.3)
        coder.b_dec.copy_(torch.randn(D_OUT, generator=g, dtype=torch.double))
        if skip:
            coder.W_skip.copy_(torch.randn(D_IN, D_OUT, generator=g, dtype=torch.double) * 0.5)
    if activation == "batchtopk":
        coder.train()
        coder.forward_full(torch.randn(64, D_IN, generator=g, dtype=torch.double))
        if mode == "eval":
            coder.eval()
    return coder


def _tangent(probes: int, seed: int, d: int = D_IN) -> torch.Tensor:
    shape = (BATCH, d) if probes == 1 else (probes, BATCH, d)
    return torch.randn(shape, generator=_gen(seed), dtype=torch.double)


def _run(coder: SparseCoder, x0: torch.Tensor, v0: torch.Tensor, w: dict[str, torch.Tensor],
         *, use_primal: bool = True):
    """Outputs and gradients (parameters, x, v) of a loss using y_hat, f, pre and J v."""
    x, v = x0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    thr = coder.batchtopk_threshold.clone()
    out, jv = coder.forward_with_jvp(x, v)
    coder.batchtopk_threshold.copy_(thr)  # BatchTopK (train): every run starts from the same EMA
    loss = (jv * w["jv"]).sum() + 0.5 * jv.square().sum()
    if use_primal:
        loss = loss + (out.y_hat * w["y"]).sum() + 0.3 * out.f.sum() + (out.pre * w["pre"]).sum()
    coder.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}
    grads["x"], grads["v"] = x.grad, v.grad
    return [out.y_hat.detach(), out.f.detach(), out.pre.detach(), out.mask, jv.detach()], grads


def _weights(probes: int) -> dict[str, torch.Tensor]:
    g = _gen(42)
    jshape = (BATCH, D_OUT) if probes == 1 else (probes, BATCH, D_OUT)
    return {"jv": torch.randn(jshape, generator=g, dtype=torch.double),
            "y": torch.randn(BATCH, D_OUT, generator=g, dtype=torch.double),
            "pre": torch.randn(BATCH, N_LAT, generator=g, dtype=torch.double)}


CASES = [(a, m, s, p, u) for (a, m) in (("topk", "eval"), ("batchtopk", "train"), ("batchtopk", "eval"))
         for s, p, u in itertools.product((False, True), (1, 3), (True, False))]


@pytest.mark.parametrize("activation,mode,skip,probes,use_primal", CASES)
def test_sparse_matches_dense_paths(activation: str, mode: str, skip: bool, probes: int,
                                    use_primal: bool) -> None:
    coder = make_coder(activation, skip, mode=mode)
    assert coder.sparse_jvp  # the default for TopK / BatchTopK
    x, v, w = _tangent(1, 1), _tangent(probes, 2), _weights(probes)
    sparse_vals, sparse_grads = _run(coder, x, v, w, use_primal=use_primal)
    coder.sparse_jvp = False
    for fused in (True, False):  # dense fused, dense plain autograd
        coder.fused = fused
        vals, grads = _run(coder, x, v, w, use_primal=use_primal)
        for a, b in zip(sparse_vals, vals):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.allclose(a, b, **TOL)
        names = {"W_enc", "W_dec", "v"} | ({"W_skip"} if skip else set())
        if use_primal:
            names |= {"b_enc", "b_dec", "x"}
        for name in names:
            assert sparse_grads[name] is not None, name
            assert grads[name] is not None, name
            assert torch.allclose(sparse_grads[name], grads[name], **TOL), name
            assert sparse_grads[name].abs().sum() > 0, name
        if not use_primal:  # through J v alone nothing reaches x, b_enc, b_dec (mask is constant)
            for name in ("x", "b_enc", "b_dec"):
                gs = sparse_grads.get(name)
                assert gs is None or torch.equal(gs, torch.zeros_like(gs)), name
    if activation == "topk":
        assert sparse_vals[3].sum(dim=1).le(K).all()


@pytest.mark.parametrize("activation,skip,probes",
                         list(itertools.product(("topk", "batchtopk"), (False, True), (1, 3))))
def test_sparse_matches_torch_func_jvp(activation: str, skip: bool, probes: int) -> None:
    coder = make_coder(activation, skip)  # BatchTopK in eval mode: a function of each row
    x, v = _tangent(1, 3), _tangent(probes, 4)
    out, jv = coder.forward_with_jvp(x, v)
    vs = v if probes > 1 else v.unsqueeze(0)
    ref = torch.stack([torch.func.jvp(coder, (x,), (vi,))[1] for vi in vs])
    assert jv.shape == ((BATCH, D_OUT) if probes == 1 else (probes, BATCH, D_OUT))
    assert torch.allclose(jv.reshape(ref.shape), ref, **TOL)
    assert jv.abs().sum() > 0
    assert torch.allclose(out.y_hat, coder(x), **TOL)


def test_flag_defaults_and_dense_fallback() -> None:
    for act in ("relu", "jumprelu"):
        assert not make_coder(act, False).sparse_jvp
    assert make_coder("topk", False).sparse_jvp and make_coder("batchtopk", False).sparse_jvp
    # the sparse routine is correct for any mask, e.g. ReLU's
    coder = make_coder("relu", True)
    x, v = _tangent(1, 5), _tangent(1, 6)
    out, jv = coder.forward_with_jvp(x, v)
    assert torch.allclose(sparse_jvp(out.mask, v, coder.W_enc, coder.W_dec, coder.W_skip), jv, **TOL)


@pytest.mark.parametrize("skip", [False, True])
def test_no_active_latents(skip: bool) -> None:
    """Rows (or the whole batch) without active latents: J v is the skip term alone."""
    coder = make_coder("topk", skip)
    _x, v = _tangent(1, 7), _tangent(3, 8)
    for empty, mask in ((True, torch.zeros(BATCH, N_LAT, dtype=torch.bool)),
                        (False, torch.rand(BATCH, N_LAT, generator=_gen(9)) < 0.2)):
        mask[0] = False
        vr = v.clone().requires_grad_(True)
        coder.zero_grad()
        jv = sparse_jvp(mask, vr, coder.W_enc, coder.W_dec, coder.W_skip)
        m = mask.double()
        ref = torch.einsum("pbi,in,bn,no->pbo", v, coder.W_enc, m, coder.W_dec)
        if skip:
            ref = ref + v @ coder.W_skip
        assert torch.allclose(jv, ref, **TOL)
        jv.square().sum().backward()
        assert vr.grad is not None and vr.grad.shape == v.shape
        vd = v.clone().requires_grad_(True)
        W = [p.detach().clone().requires_grad_(True) for p in (coder.W_enc, coder.W_dec)]
        dense = torch.einsum("pbi,in,bn,no->pbo", vd, W[0], m, W[1])
        if skip:
            dense = dense + vd @ coder.W_skip.detach()
        dense.square().sum().backward()
        assert torch.allclose(vr.grad, vd.grad, **TOL)
        for p, q in zip((coder.W_enc, coder.W_dec), W):
            assert torch.allclose(p.grad, q.grad, **TOL)
            assert (p.grad.abs().sum() == 0) == empty


def test_mask_pattern_and_transpose() -> None:
    mask = torch.rand(6, 9, generator=_gen(10)) < 0.3
    mask[2] = False
    crow, col, row = mask_pattern(mask, n_probes=2)
    dense = torch.cat([mask, mask]).to(torch.double)
    vals = torch.arange(1, col.numel() + 1, dtype=torch.double)
    csr = torch.sparse_csr_tensor(crow, col, vals, size=(12, 9), check_invariants=True)
    assert torch.equal(csr.to_dense() != 0, dense != 0)
    assert torch.equal(row, torch.repeat_interleave(torch.arange(12), crow.diff()))
    order, crow_t, col_t = transpose_pattern(col, row, 9)
    csr_t = torch.sparse_csr_tensor(crow_t, col_t, vals[order], size=(9, 12), check_invariants=True)
    assert torch.equal(csr_t.to_dense(), csr.to_dense().T)
