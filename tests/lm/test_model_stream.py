"""Batches straight from the model (no cache): right rows, every row once an epoch, exact resume."""

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm.activations import ActivationConfig, iter_model_activations  # noqa: E402
from mechfaith.lm.model_stream import ModelActivationStream  # noqa: E402

torch.set_num_threads(1)


def _cfg(layers, **kw):
    base = dict(layers=layers, batch_contexts=3, buffer_tokens=20, batch_size=10, seed=5)
    return ActivationConfig(**{**base, **kw})


def _sorted_rows(t):
    return t[torch.argsort(t[:, 0])]


def test_one_epoch_serves_every_row_once_and_layers_stay_aligned(lm, contexts):
    contexts = contexts.clone()
    contexts[:, 1] = torch.arange(2, 14)  # distinct prefixes: every (context, position) has its own row
    stream = ModelActivationStream(lm.model, contexts, [0, 2], _cfg([0, 2]))
    assert stream.block_contexts == 2 and stream.n_blocks == 6  # 20 rows // 8 per context
    n_rows = 12 * 8
    served = [stream.next_batch() for _ in range(n_rows // 10)]  # 90 of the epoch's 96 rows
    (x0, x2), (y0, y2) = (tuple(torch.cat([b[0][i] for b in served]) for i in range(2)),
                          tuple(torch.cat([b[1][i] for b in served]) for i in range(2)))
    assert stream.state_dict()["epoch"] == 0
    full = list(iter_model_activations(lm.model, contexts, [0, 2], batch_contexts=12))[0]
    # brute force: every served row of layer 0 is a distinct row of the direct capture ...
    dist = torch.cdist(x0, full[0][0], compute_mode="donot_use_mm_for_euclid_dist")
    nearest = dist.argmin(1)
    assert dist.min(1).values.max() < 1e-4 and nearest.unique().numel() == 90
    # ... and the rows of every layer are the same (context, position)s in the same order
    torch.testing.assert_close(x2, full[2][0][nearest], atol=1e-6, rtol=0)
    torch.testing.assert_close(y0, full[0][1][nearest], atol=1e-6, rtol=0)
    torch.testing.assert_close(y2, full[2][1][nearest], atol=1e-6, rtol=0)
    torch.testing.assert_close(lm.adapter.mlp_function(2)(x2), y2, atol=1e-5, rtol=1e-4)


def test_a_layer_of_a_multi_layer_stream_is_its_single_layer_stream(lm, contexts):
    multi = ModelActivationStream(lm.model, contexts, [0, 1, 2], _cfg([0, 1, 2]))
    single = ModelActivationStream(lm.model, contexts, 1, _cfg([1]))
    for _ in range(15):  # past an epoch boundary
        (xs, ys), (x, y) = multi.next_batch(), single.next_batch()
        assert torch.equal(xs[1], x) and torch.equal(ys[1], y)
    assert multi.state_dict()["epoch"] == 1


def test_resume_is_exact_mid_block_and_across_epochs(lm, contexts):
    a = ModelActivationStream(lm.model, contexts, [0, 2], _cfg([0, 2], batch_size=7))
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    assert state["row"] not in (0,)  # mid-block
    b = ModelActivationStream(lm.model, contexts, [0, 2], _cfg([0, 2], batch_size=7, seed=0))
    b.load_state_dict(state)
    for _ in range(20):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert all(torch.equal(u, v) for u, v in zip(xa + ya, xb + yb))
    with pytest.raises(ConfigError, match="layers"):
        ModelActivationStream(lm.model, contexts, [0], _cfg([0])).load_state_dict(state)
    with pytest.raises(ConfigError, match="blocks"):
        ModelActivationStream(lm.model, contexts, [0, 2], _cfg([0, 2], buffer_tokens=40)).load_state_dict(state)
    with pytest.raises(ConfigError):
        ModelActivationStream(lm.model, contexts, [0, 0])


def test_massive_rows_are_left_out_at_every_layer(lm, contexts):
    # ratio 1: every row above its block's median output norm at either layer is left out
    stream = ModelActivationStream(lm.model, contexts, [0, 2], _cfg([0, 2], buffer_tokens=200), max_norm_ratio=1.0)
    block = stream.current_block()
    full = list(iter_model_activations(lm.model, contexts, [0, 2], batch_contexts=12))[0]
    n0, n2 = full[0][1].norm(dim=1), full[2][1].norm(dim=1)  # one block holds every context here
    keep = (n0 <= n0.median()) & (n2 <= n2.median())
    assert stream.rows_seen == 96 and stream.rows_dropped == 96 - int(keep.sum()) > 40
    kept_y0 = full[0][1][keep]
    assert block[0][1].shape[0] == keep.sum()
    # the served rows are exactly the kept ones (as sets), and layer 2's rows are the same tokens
    order = torch.cdist(block[0][1], kept_y0, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    torch.testing.assert_close(block[0][1], kept_y0[order], atol=1e-5, rtol=0)
    torch.testing.assert_close(block[1][1], full[2][1][keep][order], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError):
        ModelActivationStream(lm.model, contexts, [0], _cfg([0]), max_norm_ratio=-1)
