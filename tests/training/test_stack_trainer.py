"""Stacks in the engine (training.stack_trainer): each member trains exactly as it would alone."""

from __future__ import annotations

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.errors import ConfigError
from mechfaith.training import TrainConfig, Trainer
from mechfaith.training.engine import Engine
from mechfaith.training.stack import CoderStack, StackMember, member_configs
from mechfaith.training.stack_trainer import StackTrainer, bf16_supported

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
    members = [StackMember(sparsity_coef=1e-2, n_latents=20, k=5), StackMember(sparsity_coef=1e-1, n_latents=12, k=3),
               StackMember(sparsity_coef=0.0, n_latents=16, k=4)]
    tcfg = TrainConfig(n_steps=5, lr=1e-2, lr_warmup_steps=2, sparsity="l1" if activation == "relu" else "none",
                       sparsity_coef=5e-2, sparsity_warmup_steps=2, grad_clip=1.0, auxk_coef=0.0, log_every=1)
    data = _batches(5)
    if kind == "sae":
        data = [(x, None) for x, _ in data]
    sweep = CoderStack.initialised(member_configs(base, members), [10 + i for i in range(3)])
    tr = StackTrainer(sweep, tcfg, members=members, progress=False)
    assert tr.fit(data).ok
    recs = tr.metrics_history
    assert len(recs) == 5 and len(recs[-1]["mse"]) == 3
    for i, m in enumerate(members):
        one = SparseCoder(sweep.member_cfgs[i], generator=torch.Generator().manual_seed(10 + i))
        assert one.cfg == sweep.member_coder(i).cfg
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
    members = [StackMember(sparsity_coef=c) for c in (1e-3, 1.0)]
    sweep = CoderStack.initialised(member_configs(base, members), [0, 1])
    tcfg = TrainConfig(n_steps=30, lr=1e-2, lr_warmup_steps=0, sparsity="l1", auxk_coef=0.0, log_every=30)
    res = StackTrainer(sweep, tcfg, members=members, progress=False).fit([(x, None) for x, _ in _batches(30)])
    l0 = res.final_metrics["l0"]
    assert l0[1] < l0[0]  # the stronger penalty is sparser


def test_bad_members_are_refused():
    base = CoderConfig(d_in=4, n_latents=8, activation="topk", k=4)
    with pytest.raises(ConfigError, match="width"):
        member_configs(base, [StackMember(n_latents=9)])
    with pytest.raises(ConfigError, match="k = 5"):
        member_configs(base, [StackMember(n_latents=4, k=5)])
    with pytest.raises(ConfigError, match="relu or topk"):
        member_configs(CoderConfig(d_in=4, n_latents=8, activation="jumprelu"), [StackMember()])
    with pytest.raises(ConfigError, match="penalty"):
        StackTrainer(CoderStack.initialised(member_configs(base, [StackMember()]), [0]), TrainConfig(sparsity="l0"))


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_bf16_autocast_trains_close_to_float32(activation: str):
    base = CoderConfig(d_in=6, n_latents=16, kind="sae", activation=activation, k=4)
    tcfg = TrainConfig(n_steps=3, lr=1e-2, lr_warmup_steps=0, sparsity="l1" if activation == "relu" else "none",
                       auxk_coef=0.0, log_every=1)
    data = [(x, None) for x, _ in _batches(3)]
    runs = {}
    for mp in ("no", "bf16"):
        sweep = CoderStack.initialised(member_configs(base, [StackMember(k=4), StackMember(k=2)]), [0, 1])
        tr = StackTrainer(sweep, tcfg, mixed_precision=mp, progress=False)
        assert tr.autocast == (mp == "bf16" and bf16_supported("cpu"))
        tr.fit(data)
        runs[mp] = (tr.metrics_history, sweep)
    assert runs["bf16"][1].W_enc.dtype == torch.float32  # master weights stay float32
    w0 = CoderStack.initialised(member_configs(base, [StackMember(k=4), StackMember(k=2)]), [0, 1]).W_enc
    moved = (runs["no"][1].W_enc - w0).abs().mean()
    assert moved > 0 and (runs["bf16"][1].W_enc - runs["no"][1].W_enc).abs().mean() < 0.2 * moved
    assert abs(runs["bf16"][0][-1]["mse"][0] - runs["no"][0][-1]["mse"][0]) < 0.05 * runs["no"][0][-1]["mse"][0]


def test_engine_trains_a_stack_and_single_coders_together_each_as_alone():
    """Two members of different kinds (a TopK Trainer and a ReLU stack) in one engine, fed one
    batch per member: each ends exactly where it ends trained alone on its batches."""
    data = _batches(6)
    other = [(x * 2, y) for x, y in _batches(6)]
    tcfg = TrainConfig(n_steps=6, lr=1e-2, lr_warmup_steps=2, sparsity="none", auxk_coef=0.0, log_every=3,
                       checkpoint_every=0)
    topk = CoderConfig(d_in=6, n_latents=12, activation="topk", k=3)
    relu = CoderConfig(d_in=6, n_latents=10, activation="relu")
    scfg = TrainConfig(**{**tcfg.__dict__, "sparsity": "l1", "sparsity_coef": 1e-2})

    def make():
        single = Trainer(SparseCoder(topk, generator=torch.Generator().manual_seed(3)), tcfg, progress=False,
                         name="topk")
        stack = StackTrainer(CoderStack.initialised([relu, relu], [4, 5]), scfg, progress=False, name="relu")
        return single, stack

    a, b = make()
    results = Engine([a, b], progress=False).fit(iter(((xa, xb), (ya, yb)) for (xa, ya), (xb, yb)
                                                       in zip(data, other)))
    assert [r.steps_done for r in results] == [6, 6] and all(r.ok for r in results)
    a1, b1 = make()
    a1.fit(data)
    b1.fit(other)
    for name, p in a1.coder.named_parameters():
        torch.testing.assert_close(getattr(a.coder, name), p, rtol=0, atol=0)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(b.stack, name), getattr(b1.stack, name), rtol=0, atol=0)


def test_engine_stops_every_member_on_one_members_nan():
    tcfg = TrainConfig(n_steps=3, lr=1e-2, sparsity="none", auxk_coef=0.0, log_every=1, checkpoint_every=0)
    cfg = CoderConfig(d_in=6, n_latents=12, activation="topk", k=3)
    a = Trainer(SparseCoder(cfg), tcfg, progress=False, name="a")
    b = Trainer(SparseCoder(cfg), tcfg, progress=False, name="b")
    before = [p.detach().clone() for p in a.coder.parameters()]
    x, y = _batches(1)[0]
    bad = x.clone()
    bad[0, 0] = float("nan")
    from mechfaith.errors import InputError
    from mechfaith.training.engine import run_step
    with pytest.raises(InputError, match="member b"):
        run_step([a, b], [(x, y), (bad, y)])
    assert a.step_count == 0 and b.step_count == 0
    for p, q in zip(a.coder.parameters(), before):
        assert torch.equal(p.detach(), q)  # the healthy member was not updated either
