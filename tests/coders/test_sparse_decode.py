"""Sparse decoding (coders.sparse_decode) against the dense coder: values and every gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder, build_coder
from mechfaith.coders.penalties import sparsity_penalty
from mechfaith.coders.sparse_decode import SparseCoderOutput, SparseDecodeCoder, enable_sparse_decode, sparse_decode
from mechfaith.training import TrainConfig, Trainer

torch.set_num_threads(1)
DT = torch.float64


def test_sparse_decode_matches_dense_decode_with_gradients():
    g = torch.Generator().manual_seed(0)
    B, n, d = 7, 20, 5
    keep = torch.rand(B, n, generator=g) < 0.3
    keep[3] = False  # an empty row
    row, col = keep.nonzero(as_tuple=True)
    crow = torch.zeros(B + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=B), 0)
    val = torch.randn(col.numel(), generator=g, dtype=DT)
    val[::4] = 0.0  # listed zeros still get their gradient
    W = torch.randn(n, d, generator=g, dtype=DT)
    b = torch.randn(d, generator=g, dtype=DT)
    gy = torch.randn(B, d, generator=g, dtype=DT)

    v1, W1, b1 = (t.clone().requires_grad_() for t in (val, W, b))
    y1 = sparse_decode(crow, col, v1, W1, b1)
    y1.backward(gy)

    v2, W2, b2 = (t.clone().requires_grad_() for t in (val, W, b))
    f = torch.zeros(B, n, dtype=DT).index_put((row, col), v2)
    y2 = f @ W2 + b2
    y2.backward(gy)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(v1.grad, v2.grad)
    torch.testing.assert_close(W1.grad, W2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)
    assert v1.grad[0::4].abs().sum() > 0  # zero entries got a gradient
    # the gradient of a listed entry is g_y[row] . W[col]
    torch.testing.assert_close(v1.grad, (gy[row] * W[col]).sum(-1))


def _pair(cfg: CoderConfig, seed: int = 0) -> tuple[SparseCoder, SparseDecodeCoder]:
    dense = SparseCoder(cfg, generator=torch.Generator().manual_seed(seed), dtype=DT)
    with torch.no_grad():
        dense.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        dense.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 2))
        if dense.W_skip is not None:
            dense.W_skip.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 3))
    sparse = enable_sparse_decode(copy.deepcopy(dense))
    return dense, sparse


def _loss_and_grads(coder: SparseCoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor,
                    penalty: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    coder.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = coder.forward_full(x)
    loss = (out.y_hat - y).square().sum() / x.shape[0]
    loss = loss + 0.1 * sparsity_penalty(penalty, coder, out)  # reaches f (l1) or pre (l0)
    loss = loss + 0.01 * (out.pre * dead).relu().sum()  # a gradient arriving at pre (like AuxK)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}
    return out.y_hat.detach(), grads, x.grad


@pytest.mark.parametrize("activation,skip,kind", [
    ("topk", False, "sae"), ("topk", True, "transcoder"), ("batchtopk", False, "transcoder"),
    ("jumprelu", False, "sae"), ("jumprelu", True, "transcoder")])
def test_sparse_coder_matches_the_dense_coder(activation: str, skip: bool, kind: str):
    d, n, B = 6, 24, 10
    cfg = CoderConfig(d_in=d, n_latents=n, kind=kind, activation=activation, k=4, skip=skip and kind != "sae",
                      jumprelu_threshold=0.3, jumprelu_bandwidth=0.4)
    dense, sparse = _pair(cfg)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, d, generator=g, dtype=DT)
    y = x if kind == "sae" else torch.tanh(x @ torch.randn(d, d, generator=g, dtype=DT))
    dead = (torch.rand(n, generator=g) < 0.5).to(DT)
    penalty = "l0" if activation == "jumprelu" else "l1"
    out = sparse.forward_full(x.clone().requires_grad_())
    assert isinstance(out, SparseCoderOutput)
    yd, gd, xd = _loss_and_grads(dense, x, y, dead, penalty)
    ys, gs, xs = _loss_and_grads(sparse, x, y, dead, penalty)
    torch.testing.assert_close(ys, yd)
    assert set(gs) == set(gd)
    for name in gd:
        torch.testing.assert_close(gs[name], gd[name], msg=name)
    assert xs is not None and xd is not None
    torch.testing.assert_close(xs, xd)
    if activation == "jumprelu":
        assert gd["log_threshold"].abs().sum() > 0  # the band's gradient was exercised
    # the lazily built dense latents and mask equal the dense path's
    with torch.no_grad():
        od, os_ = dense.forward_full(x), sparse.forward_full(x)
    torch.testing.assert_close(os_.f, od.f)
    assert torch.equal(os_.mask, od.mask)


def test_trainer_steps_with_sparse_decoding_match_dense_steps():
    cfg = CoderConfig(d_in=8, n_latents=32, kind="sae", activation="topk", k=4, decoder_norm="unit")
    tcfg = TrainConfig(n_steps=4, lr=1e-2, lr_warmup_steps=0, sparsity="none", log_every=1)
    dense = build_coder(cfg, seed=3)
    sparse = enable_sparse_decode(copy.deepcopy(dense))
    assert isinstance(sparse, SparseCoder)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 8, generator=g) for _ in range(4)]
    td, ts = Trainer(dense, tcfg, progress=False), Trainer(sparse, tcfg, progress=False)
    for x in batches:
        rd, rs = td.step(x), ts.step(x)
        assert rd["l0"] == rs["l0"] and abs(rd["loss"] - rs["loss"]) < 1e-4 * max(1.0, rd["loss"])
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)


def test_no_grad_and_relu_take_the_dense_path():
    relu = enable_sparse_decode(build_coder(CoderConfig(d_in=4, n_latents=8), seed=0))
    x = torch.randn(3, 4)
    assert not isinstance(relu.forward_full(x), SparseCoderOutput)
    topk = enable_sparse_decode(build_coder(CoderConfig(d_in=4, n_latents=8, activation="topk", k=2), seed=0))
    with torch.no_grad():
        assert not isinstance(topk.forward_full(x), SparseCoderOutput)
