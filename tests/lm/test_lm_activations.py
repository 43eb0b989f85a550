"""Activation store: collection, shuffle buffer, disk shards, batch streams."""

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.errors import CoderFileError, ConfigError  # noqa: E402
from mechfaith.lm.activation_cache import (  # noqa: E402
    ActivationCache,
    CachedActivationStream,
    write_activation_cache,
)
from mechfaith.lm.activations import (  # noqa: E402
    ActivationConfig,
    ShuffleBuffer,
    iter_model_activations,
)

torch.set_num_threads(1)


def test_collection_matches_direct_capture_and_drops_bos(lm, contexts):
    batches = list(iter_model_activations(lm.model, contexts, [0, 2], batch_contexts=5, exclude_bos=True))
    assert len(batches) == 3
    x0 = torch.cat([b[0][0] for b in batches])
    y2 = torch.cat([b[2][1] for b in batches])
    assert x0.shape == (12 * 8, 32) and y2.shape == (12 * 8, 32)
    with torch.no_grad():
        ref = lm.adapter.run_with_cache(contexts, [(0, "mlp_in"), (2, "mlp_out")], stop_early=False)
    torch.testing.assert_close(x0, ref[(0, "mlp_in")][:, 1:].reshape(-1, 32))
    torch.testing.assert_close(y2, ref[(2, "mlp_out")][:, 1:].reshape(-1, 32))
    # the pairs are what the MLP computes
    torch.testing.assert_close(lm.adapter.mlp_function(0)(x0), batches and torch.cat([b[0][1] for b in batches]),
                               atol=1e-5, rtol=1e-4)


def test_shuffle_buffer_releases_every_row_once_in_mixed_order():
    buf = ShuffleBuffer(10, torch.Generator().manual_seed(0))
    out = []
    for i in range(0, 40, 7):
        rows = torch.arange(i, min(i + 7, 40))
        for chunk in buf.add(rows, rows * 10):
            out.append(chunk)
        assert buf.size <= 10
    out += buf.flush()
    a = torch.cat([c[0] for c in out])
    b = torch.cat([c[1] for c in out])
    assert sorted(a.tolist()) == list(range(40))
    assert torch.equal(b, a * 10)  # rows stay aligned
    assert a.tolist() != list(range(40))


def test_disk_cache_round_trip_and_exact_resume(lm, contexts, tmp_path):
    cfg = ActivationConfig(layers=[0, 1], batch_contexts=4, buffer_tokens=20, shard_tokens=30, seed=1)
    folder = write_activation_cache(lm.model, contexts, cfg, tmp_path / "acts", model_name="tiny", progress=False)
    cache = ActivationCache(folder)
    assert cache.layers == [0, 1] and cache.n_tokens == 96 and cache.d_in == 32
    assert [s["rows"] for s in cache.shards(0)] == [30, 30, 30, 6]
    cache.verify()
    x, y = cache.load(1)
    # same multiset of pairs as a direct capture: the shuffled pairs still match y = MLP(x)
    torch.testing.assert_close(lm.adapter.mlp_function(1)(x), y, atol=1e-5, rtol=1e-4)
    direct = torch.cat([b[1][0] for b in iter_model_activations(lm.model, contexts, [1])])
    assert torch.allclose(x.sum(0), direct.sum(0), atol=1e-4)
    assert not torch.equal(x, direct)  # shuffled

    s1 = CachedActivationStream(folder, 1, batch_size=25, seed=3)
    first = [s1.next_batch() for _ in range(3)]
    state = s1.state_dict()
    rest = [s1.next_batch() for _ in range(5)]  # crosses into the next epoch
    s2 = cache.stream(1, batch_size=25, seed=0)
    s2.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(rest, [s2.next_batch() for _ in range(5)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # one epoch covers every row exactly once
    s3 = CachedActivationStream(folder, 1, batch_size=96, seed=5)
    xe, _ = s3.next_batch()
    assert torch.allclose(xe.sum(0), x.sum(0), atol=1e-4)
    assert first[0][0].shape == (25, 32)


def test_damaged_cache_is_reported(lm, contexts, tmp_path):
    cfg = ActivationConfig(layers=[0], buffer_tokens=16, shard_tokens=50)
    folder = write_activation_cache(lm.model, contexts, cfg, tmp_path / "acts", progress=False)
    shard = folder / ActivationCache(folder).shards(0)[0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CoderFileError):
        ActivationCache(folder).verify()
    with pytest.raises(CoderFileError):
        ActivationCache(folder).read_shard(0, 0)
    with pytest.raises(CoderFileError, match="not an activation cache"):
        ActivationCache(tmp_path)


def test_config_checks():
    with pytest.raises(ConfigError):
        ActivationConfig(layers=[])
    with pytest.raises(ConfigError):
        ActivationConfig(input_site="mlp_out")


def test_trainer_fits_a_transcoder_from_the_cache_with_the_mlp_as_jacobian_reference(lm, contexts, tmp_path):
    trainer_mod = pytest.importorskip("mechfaith.training.trainer")
    from mechfaith.coders import CoderConfig, SparseCoder
    from mechfaith.training.config import TrainConfig

    folder = write_activation_cache(lm.model, contexts, ActivationConfig(layers=[1], buffer_tokens=32,
                                                                         shard_tokens=40), tmp_path / "a",
                                    progress=False)
    stream = ActivationCache(folder).stream(1, batch_size=32, seed=0)
    coder = SparseCoder(CoderConfig(d_in=32, n_latents=64, d_out=32, activation="topk", k=8),
                        generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(n_steps=30, batch_size=32, lr=1e-2, lr_warmup_steps=0, sparsity="none",
                      jacobian_coef=0.1)
    trainer = trainer_mod.Trainer(coder, cfg, reference=lm.adapter.mlp_function(1), progress=False)
    x, y = ActivationCache(folder).load(1)
    before = (coder(x) - y).pow(2).sum(-1).mean().item()
    trainer.fit(stream)
    after = (coder(x) - y).pow(2).sum(-1).mean().item()
    assert after < 0.5 * before
