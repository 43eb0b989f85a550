"""The CLT trainer (training.clt_trainer, training.clt_losses): a reach-0 CLT trains exactly like a
per-layer transcoder set, the Jacobian term equals a brute-force Jacobian difference, resume is exact."""

from __future__ import annotations

import importlib

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.errors import InputError
from mechfaith.training import TrainConfig, Trainer
from mechfaith.training.clt_losses import clt_jacobian, clt_sparsity
from mechfaith.training.clt_trainer import CLTTrainer
from mechfaith.training.streams import FunctionStream

jm_module = importlib.import_module("mechfaith.training.jacobian_matching")
torch.set_num_threads(1)
L, D, N = 3, 5, 12


def _mlps(dtype: torch.dtype = torch.float64) -> list[torch.nn.Module]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(L):
        m = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.GELU(), torch.nn.Linear(16, D)).to(dtype)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        out.append(m)
    return out


def _batch(g: torch.Generator, b: int, mlps: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(L, b, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = torch.stack([m(x[t]) for t, m in enumerate(mlps)])
    return x, y


def test_reach_zero_clt_trains_exactly_like_per_layer_trainers(monkeypatch):
    mlps = _mlps()
    tcfg = TrainConfig(n_steps=6, lr=1e-2, lr_warmup_steps=2, sparsity="l1", sparsity_coef=1e-2,
                       sparsity_warmup_steps=3, auxk_coef=0.0, log_every=1, jacobian_coef=0.5, n_probes=1)
    ccfg = CoderConfig(d_in=D, n_latents=N, activation="relu", skip=True, decoder_norm="penalty")
    coders = [SparseCoder(ccfg, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(L)]
    clt = CrossLayerTranscoder.from_coders(coders)
    g = torch.Generator().manual_seed(1)
    batches = [_batch(g, 16, mlps) for _ in range(6)]
    # the CLT's probes: one [L, B, D] draw per step from its generator; give each per-layer trainer
    # the same probes by replaying the draws
    tr = CLTTrainer(clt, tcfg, references=mlps, progress=False)
    probe_gen = torch.Generator().manual_seed(tcfg.seed)
    probes = [torch.randn((L, 16, D), generator=probe_gen, dtype=torch.float64) for _ in range(6)]
    assert tr.fit(batches).ok
    for s, c in enumerate(coders):
        one = Trainer(c, tcfg, reference=mlps[s], progress=False)
        for i, (x, y) in enumerate(batches):  # the per-layer trainer sees layer s of the CLT's probes
            monkeypatch.setattr(jm_module, "sample_probes", lambda x_, n_, g_=None, _p=probes[i][s]: _p)
            one.step(x[s], y[s])
        back = clt.layer_coder(s)
        for name, p in c.named_parameters():
            torch.testing.assert_close(getattr(back, name), p.detach(), atol=1e-10, rtol=1e-8, msg=f"{s} {name}")
    rec = tr.metrics_history[-1]
    assert {"fve", "l0", "l0_token", "dead_frac", "jacobian", "jacobian_rel", "sparsity"} <= set(rec)
    assert rec["l0_token"] == pytest.approx(rec["l0"] * L)


@pytest.mark.parametrize("reach", [None, 1])
def test_jacobian_term_equals_brute_force_jacobians(reach):
    mlps = _mlps()
    cfg = CLTConfig(n_layers=L, d_in=D, n_latents=N, reach=reach, activation="jumprelu", skip=True,
                    jumprelu_threshold=0.1)
    clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, _ = _batch(torch.Generator().manual_seed(3), 4, mlps)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    out = clt.forward_full(x)
    loss, ref_sq, ref_y = clt_jacobian(clt, out, mlps, x, v)
    want, want_ref = 0.0, 0.0
    for t in range(L):
        for b in range(x.shape[1]):
            def layer_t(z: torch.Tensor) -> torch.Tensor:
                xs = x.clone()
                xs[t, b] = z
                return clt.forward_full(xs).y_hat[t, b]
            j_clt = torch.autograd.functional.jacobian(layer_t, x[t, b])
            j_mlp = torch.autograd.functional.jacobian(mlps[t], x[t, b])
            want += float(((j_mlp - j_clt) @ v[t, b]).pow(2).sum())
            want_ref += float((j_mlp @ v[t, b]).pow(2).sum())
    assert loss.item() == pytest.approx(want / x.shape[1], rel=1e-9)
    assert ref_sq.item() == pytest.approx(want_ref / x.shape[1], rel=1e-9)
    torch.testing.assert_close(ref_y, torch.stack([m(x[t]) for t, m in enumerate(mlps)]).detach())
    # the penalties, term by term
    norms = torch.stack([sum(clt.decoder_to(s, t).norm(dim=-1) for t in range(s, L) if t - s <= (reach or L))
                         for s in range(L)])
    torch.testing.assert_close(clt_sparsity("l1", clt, out), (out.f * norms[:, None]).sum() / 4)
    torch.testing.assert_close(clt_sparsity("tanh_l1", clt, out, 4.0),
                               torch.tanh(4.0 * out.f * norms[:, None]).sum() / 4)
    assert clt_sparsity("l0", clt, out).item() == pytest.approx(float((out.f != 0).sum()) / 4)


def test_cross_layer_training_learns_and_resume_is_exact(tmp_path):
    mlps = _mlps()
    cfg = CLTConfig(n_layers=L, d_in=D, n_latents=N, activation="topk", k=4, skip=False, init_scale=0.5)
    tcfg = TrainConfig(n_steps=40, lr=5e-3, sparsity="none", auxk_coef=0.0, log_every=10, checkpoint_every=20,
                       lr_warmup_steps=0)

    calls = {"n": 0, "stop": 10**9}

    def draw(g: torch.Generator, b: int) -> tuple[torch.Tensor, ...]:
        calls["n"] += 1
        if calls["n"] > calls["stop"]:
            raise KeyboardInterrupt  # the run is killed while reading batch 21
        return tuple(t.float() for t in _batch(g, b, mlps))  # float32: checkpoints hold float32 weights

    def stream() -> FunctionStream:
        calls["n"] = 0
        return FunctionStream(draw, batch_size=32, seed=11)

    a = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(0))
    ta = CLTTrainer(a, tcfg, log_path=tmp_path / "a.jsonl", checkpoint_dir=tmp_path / "ca", progress=False)
    assert ta.fit(stream()).ok
    first, last = ta.metrics_history[0], ta.metrics_history[-1]
    assert last["fve"] > first["fve"] + 0.2
    assert last["l0"] <= 4
    # stop at step 20 (the periodic checkpoint), then resume in a fresh trainer
    b = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(0))
    calls["stop"] = 20
    with pytest.raises(KeyboardInterrupt):
        CLTTrainer(b, tcfg, checkpoint_dir=tmp_path / "cb", progress=False).fit(stream())
    calls["stop"] = 10**9
    c = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(99))
    tc = CLTTrainer(c, tcfg, checkpoint_dir=tmp_path / "cb", progress=False)
    assert tc.fit(stream(), resume=True).ok
    for k, v in a.state_dict().items():
        assert torch.equal(c.state_dict()[k], v), k
    assert (tmp_path / "ca" / "coder" / "config.json").is_file()


def test_bad_batches_are_refused_before_any_update():
    cfg = CLTConfig(n_layers=L, d_in=D, n_latents=N, activation="relu")
    clt = CrossLayerTranscoder(cfg, dtype=torch.float64)
    tr = CLTTrainer(clt, TrainConfig(n_steps=2, auxk_coef=0.0), progress=False)
    before = {k: v.clone() for k, v in clt.state_dict().items()}
    with pytest.raises(InputError, match="expected a float tensor"):
        tr.step(torch.zeros(16, D, dtype=torch.float64), None)
    with pytest.raises(InputError, match="no target"):
        tr.step(torch.zeros(L, 4, D, dtype=torch.float64), None)
    x = torch.zeros(L, 4, D, dtype=torch.float64)
    y = torch.zeros(L, 4, D, dtype=torch.float64)
    y[1, 2, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        tr.step(x, y)
    for k, v in clt.state_dict().items():
        assert torch.equal(v, before[k])
    assert tr.step_count == 0
