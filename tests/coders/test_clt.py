"""Cross-layer transcoders (coders.clt, coders.clt_files): against per-layer coders, brute-force
sums over (source, target) pairs and autograd."""

from __future__ import annotations

import json

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.coders.clt_files import is_clt_folder, load_clt, save_clt
from mechfaith.errors import CoderFileError, ConfigError, InputError

torch.set_num_threads(1)
L, D, N = 4, 6, 10


def _clt(activation: str = "relu", reach: int | None = None, skip: bool = True, seed: int = 0,
         dtype: torch.dtype = torch.float64) -> CrossLayerTranscoder:
    cfg = CLTConfig(n_layers=L, d_in=D, n_latents=N, d_out=D + 1, reach=reach, activation=activation, k=3,
                    skip=skip, jumprelu_threshold=0.05)
    clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # nonzero biases and skips, so every term is tested
        for p in clt.parameters():
            if p is not clt.log_threshold:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    return clt


def _x(b: int = 7, seed: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(L, b, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("reach", [None, 0, 1, 2])
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_forward_equals_the_sum_over_source_target_pairs(activation: str, reach: int | None):
    clt = _clt(activation, reach)
    x = _x()
    out = clt.forward_full(x)
    pre = torch.stack([x[s] @ clt.W_enc[s] + clt.b_enc[s] for s in range(L)])
    torch.testing.assert_close(out.pre, pre)
    for t in range(L):
        want = clt.b_dec[t] + x[t] @ clt.W_skip[t]  # type: ignore[index]
        for s in range(t + 1):
            reach_s = L if reach is None else reach
            if t - s <= reach_s:
                want = want + out.f[s] @ clt.W_dec(s)[:, t - s]
        torch.testing.assert_close(out.y_hat[t], want)
    if activation == "topk":
        assert int((out.f > 0).sum(-1).max()) <= 3
    if activation == "jumprelu":
        assert bool(((out.f == 0) | (out.pre > clt.threshold().unsqueeze(1))).all())
    assert clt.sources_of(L - 1) == [s for s in range(L) if reach is None or L - 1 - s <= reach]


@pytest.mark.parametrize("reach", [None, 1])
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_local_jvp_equals_autograd_with_other_layers_held(activation: str, reach: int | None):
    clt = _clt(activation, reach)
    x = _x()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    out = clt.forward_full(x)
    jv = clt.local_jvp(out, v)
    for t in range(L):
        only_t = torch.zeros_like(v)
        only_t[t] = v[t]
        _, full = torch.func.jvp(lambda z: clt.forward_full(z).y_hat, (x,), (only_t,))
        torch.testing.assert_close(jv[t], full[t], atol=1e-12, rtol=1e-10)
    # the total derivative of later layers also moves when reach > 0 (the cross-layer writes)
    only_0 = torch.zeros_like(v)
    only_0[0] = v[0]
    _, full0 = torch.func.jvp(lambda z: clt.forward_full(z).y_hat, (x,), (only_0,))
    moved = full0[1:].abs().max()
    assert (moved > 0) == (reach != 0)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_reach_zero_clt_is_a_per_layer_transcoder_set(activation: str):
    coders = []
    for s in range(L):
        cfg = CoderConfig(d_in=D, n_latents=N, d_out=D + 1, activation=activation, k=3, skip=True,
                          jumprelu_threshold=0.05)
        c = SparseCoder(cfg, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        with torch.no_grad():
            c.b_enc.add_(0.1)
            c.W_skip.add_(0.05 * s)  # type: ignore[union-attr]
            c.b_dec.add_(0.01 * s)
        coders.append(c)
    clt = CrossLayerTranscoder.from_coders(coders, first_layer=3)
    assert clt.cfg.reach == 0 and clt.cfg.layers == [3, 4, 5, 6]
    x = _x()
    out = clt.forward_full(x)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    jv = clt.local_jvp(out, v)
    for s, c in enumerate(coders):
        o = c.forward_full(x[s])
        torch.testing.assert_close(out.y_hat[s], o.y_hat)
        torch.testing.assert_close(out.f[s], o.f)
        torch.testing.assert_close(jv[s], c.jvp_from(o, v[s]))
        back = clt.layer_coder(s)
        for name, p in c.named_parameters():
            torch.testing.assert_close(getattr(back, name), p)
    with pytest.raises(ConfigError):
        _clt(activation, reach=1).layer_coder(1)


def test_decoder_norms_and_sizes():
    clt = _clt("jumprelu", reach=2)
    norms = clt.decoder_norms()
    for s in range(L):
        want = sum(clt.decoder_to(s, t).norm(dim=-1) for t in range(s, min(L, s + 3)))
        torch.testing.assert_close(norms[s], want)
    shapes = {k: tuple(v.shape) for k, v in clt.state_dict().items()}
    assert shapes == CrossLayerTranscoder.state_shapes(clt.cfg)
    assert clt.cfg.n_parameters() == sum(p.numel() for p in clt.parameters())
    # a full CLT holds L (L + 1) / 2 decoder blocks
    full = CLTConfig(n_layers=6, d_in=8, n_latents=5)
    assert sum(full.n_targets(s) for s in range(6)) == 21
    fresh = CrossLayerTranscoder(full, generator=torch.Generator().manual_seed(0))
    for s in range(6):  # each latent's decoder rows, concatenated over its targets: norm init_scale
        torch.testing.assert_close(fresh.W_dec(s).reshape(5, -1).norm(dim=1), torch.ones(5))


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ConfigError, match="reach"):
        CLTConfig(n_layers=2, d_in=4, n_latents=4, reach=-1)
    with pytest.raises(ConfigError, match="k = 9"):
        CLTConfig(n_layers=2, d_in=4, n_latents=4, activation="topk", k=9)
    with pytest.raises(ConfigError, match="finite"):
        CLTConfig(n_layers=2, d_in=4, n_latents=4, init_scale=float("nan"))
    clt = _clt()
    with pytest.raises(InputError, match="expected"):
        clt(torch.zeros(L + 1, 2, D, dtype=torch.float64))


def test_save_load_round_trip_and_damage(tmp_path):
    clt = _clt("jumprelu", reach=1, dtype=torch.float32)
    folder = save_clt(clt, tmp_path / "clt")
    assert is_clt_folder(folder) and not is_clt_folder(tmp_path)
    back = load_clt(folder)
    assert back.cfg == clt.cfg
    for k, v in clt.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    # damage: a changed byte (checksum), a config that does not match the tensors
    weights = folder / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(CoderFileError, match="checksum"):
        load_clt(folder)
    folder = save_clt(clt, tmp_path / "clt2")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["reach"] = 2
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CoderFileError, match="W_dec_0"):
        load_clt(folder)
    meta["config"]["reach"] = "x"
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CoderFileError, match="bad config"):
        load_clt(folder)
