"""Batched sweeps (training.sweep): each member trains exactly as it would alone."""

from __future__ import annotations

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.errors import ConfigError
from mechfaith.training import TrainConfig, Trainer
from mechfaith.training.sweep import CoderSweep, SweepMember, SweepTrainer

torch.set_num_threads(1)


def _batches(n: int, b: int = 24, d: int = 6):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, d, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(b, d, generator=g)
        out.append((x, torch.tanh(x @ w)))
    return out


@pytest.mark.parametrize("activation,kind,norm", [("relu", "transcoder", "penalty"), ("relu", "sae", "unit"),
                                                  ("topk", "transcoder", "unit")])
def test_every_member_matches_a_single_trainer_run(activation: str, kind: str, norm: str):
    base = CoderConfig(d_in=6, n_latents=20, kind=kind, activation=activation, k=5, decoder_norm=norm)
    members = [SweepMember(sparsity_coef=1e-2, n_latents=20, k=5), SweepMember(sparsity_coef=1e-1, n_latents=12, k=3),
               SweepMember(sparsity_coef=0.0, n_latents=16, k=4)]
    tcfg = TrainConfig(n_steps=5, lr=1e-2, lr_warmup_steps=2, sparsity="l1" if activation == "relu" else "none",
                       sparsity_coef=5e-2, sparsity_warmup_steps=2, grad_clip=1.0, auxk_coef=0.0, log_every=1)
    data = _batches(5)
    if kind == "sae":
        data = [(x, None) for x, _ in data]
    sweep = CoderSweep(base, members, seed=10)
    recs = SweepTrainer(sweep, tcfg, progress=False).fit(data)
    assert len(recs) == 5 and len(recs[-1]["recon"]) == 3
    for i, m in enumerate(members):
        one = SparseCoder(sweep.member_cfgs[i], generator=torch.Generator().manual_seed(10 + i))
        cfg_i = TrainConfig(**{**tcfg.__dict__, "sparsity_coef": m.sparsity_coef}) if m.sparsity_coef else \
            TrainConfig(**{**tcfg.__dict__, "sparsity": "none"})
        Trainer(one, cfg_i, progress=False).fit(data)
        got = sweep.member_coder(i)
        assert got.cfg == one.cfg
        for name, p in one.named_parameters():
            torch.testing.assert_close(getattr(got, name), p.detach(), atol=2e-5, rtol=1e-4,
                                       msg=f"member {i} {name}")
    # latents beyond a member's width never change
    assert sweep.W_enc[1, :, 12:].abs().sum() == 0 and sweep.W_dec[1, 12:].abs().sum() == 0


def test_members_differ_and_l0_follows_the_coefficient():
    base = CoderConfig(d_in=6, n_latents=24, kind="sae", activation="relu")
    sweep = CoderSweep(base, [SweepMember(sparsity_coef=c) for c in (1e-3, 1.0)], seed=0)
    tcfg = TrainConfig(n_steps=30, lr=1e-2, lr_warmup_steps=0, sparsity="l1", auxk_coef=0.0, log_every=30)
    recs = SweepTrainer(sweep, tcfg, progress=False).fit([(x, None) for x, _ in _batches(30)])
    l0 = recs[-1]["l0"]
    assert l0[1] < l0[0]  # the stronger penalty is sparser


def test_bad_members_are_refused():
    base = CoderConfig(d_in=4, n_latents=8, activation="topk", k=4)
    with pytest.raises(ConfigError, match="width"):
        CoderSweep(base, [SweepMember(n_latents=9)])
    with pytest.raises(ConfigError, match="k = 5"):
        CoderSweep(base, [SweepMember(n_latents=4, k=5)])
    with pytest.raises(ConfigError, match="relu or topk"):
        CoderSweep(CoderConfig(d_in=4, n_latents=8, activation="jumprelu"), [SweepMember()])


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_bf16_autocast_trains_close_to_float32(activation: str):
    from mechfaith.training.sweep import bf16_supported
    base = CoderConfig(d_in=6, n_latents=16, kind="sae", activation=activation, k=4)
    tcfg = TrainConfig(n_steps=3, lr=1e-2, lr_warmup_steps=0, sparsity="l1" if activation == "relu" else "none",
                       auxk_coef=0.0, log_every=1)
    data = [(x, None) for x, _ in _batches(3)]
    runs = {}
    for mp in ("no", "bf16"):
        sweep = CoderSweep(base, [SweepMember(k=4), SweepMember(k=2)], seed=0)
        tr = SweepTrainer(sweep, tcfg, mixed_precision=mp, progress=False)
        assert tr.autocast == (mp == "bf16" and bf16_supported("cpu"))
        runs[mp] = (tr.fit(data), sweep)
    assert runs["bf16"][1].W_enc.dtype == torch.float32  # master weights stay float32
    w0 = CoderSweep(base, [SweepMember(k=4), SweepMember(k=2)], seed=0).W_enc
    moved = (runs["no"][1].W_enc - w0).abs().mean()
    assert moved > 0 and (runs["bf16"][1].W_enc - runs["no"][1].W_enc).abs().mean() < 0.2 * moved
    assert abs(runs["bf16"][0][-1]["recon"][0] - runs["no"][0][-1]["recon"][0]) < 0.05 * runs["no"][0][-1]["recon"][0]
