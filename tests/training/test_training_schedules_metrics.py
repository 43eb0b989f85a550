"""Training schedules, metrics and the TrainConfig's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechfaith.configs import config_from_dict, field_help
from mechfaith.errors import ConfigError
from mechfaith.training import metrics
from mechfaith.training.config import TrainConfig
from mechfaith.training.dead_latents import DeadLatentTracker, auxk_loss
from mechfaith.training.schedules import decay_factor, lr_at, sparsity_coef_at, warmup_factor


# ------------------------------------------------------------------------------------ schedules
def test_lr_warmup_then_linear_decay_key_steps():
    cfg = TrainConfig(n_steps=1000, lr=1e-3, lr_warmup_steps=100, lr_decay="linear",
                      lr_decay_frac=0.2, lr_final_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-5)  # (0 + 1) / 100 of the peak
    assert lr_at(49, cfg) == pytest.approx(0.5e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(500, cfg) == pytest.approx(1e-3)
    assert lr_at(799, cfg) == pytest.approx(1e-3)  # the decay starts at 1000 - 200 = 800
    assert lr_at(800, cfg) == pytest.approx(1e-3)
    assert lr_at(900, cfg) == pytest.approx(1e-3 * (1 - 0.5 * 0.9))  # half way: 0.55 of the peak
    assert lr_at(999, cfg) == pytest.approx(1e-3 * (1 - (199 / 200) * 0.9))
    assert decay_factor(1000, 1000, "linear", 0.2, 0.1) == pytest.approx(0.1)  # one past the end
    lrs = [lr_at(s, cfg) for s in range(800, 1000)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_cosine_decay_and_none():
    cfg = TrainConfig(n_steps=100, lr=2.0, lr_warmup_steps=0, lr_decay="cosine", lr_decay_frac=1.0,
                      lr_final_frac=0.0)
    assert lr_at(0, cfg) == pytest.approx(2.0)
    assert lr_at(50, cfg) == pytest.approx(1.0)  # cos(pi/2) = 0: half way between 2 and 0
    assert lr_at(25, cfg) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    none = TrainConfig(n_steps=100, lr=2.0, lr_warmup_steps=0, lr_decay="none")
    assert {lr_at(s, none) for s in range(100)} == {2.0}


def test_sparsity_warmup():
    cfg = TrainConfig(sparsity_coef=0.4, sparsity_warmup_steps=4)
    assert [sparsity_coef_at(s, cfg) for s in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert sparsity_coef_at(0, TrainConfig(sparsity_coef=0.4)) == 0.4
    assert warmup_factor(3, 0) == 1.0


# ------------------------------------------------------------------------------------ metrics
def test_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 7, generator=g, dtype=torch.float64) * 3 + 1
    y_hat = y + 0.3 * torch.randn(50, 7, generator=g, dtype=torch.float64)
    yn, hn = y.numpy(), y_hat.numpy()
    assert metrics.mse(y_hat, y).item() == pytest.approx(np.mean((hn - yn) ** 2))
    var = np.sum((yn - yn.mean(axis=0)) ** 2)
    assert metrics.fve(y_hat, y).item() == pytest.approx(1 - np.sum((yn - hn) ** 2) / var)
    assert metrics.fve(y.mean(0, keepdim=True).expand_as(y), y).item() == pytest.approx(0.0, abs=1e-12)
    assert metrics.fve(y, y).item() == 1.0
    f = torch.relu(torch.randn(40, 30, generator=g))
    assert metrics.l0(f).item() == pytest.approx(np.count_nonzero(f.numpy()) / 40)
    assert metrics.l0(f > 0).item() == pytest.approx(np.count_nonzero(f.numpy()) / 40)
    since = torch.tensor([0, 5, 10, 11, 100])
    assert metrics.dead_fraction(since, 10).item() == pytest.approx(3 / 5)


def test_dead_latent_tracker_counts_tokens():
    t = DeadLatentTracker(3)
    t.update(torch.tensor([True, False, False]), 8)
    t.update(torch.tensor([False, True, False]), 8)
    assert t.tokens_since_fired.tolist() == [8, 0, 16]
    assert t.dead_mask(16).tolist() == [False, False, True]
    assert t.dead_fraction(8).item() == pytest.approx(2 / 3)
    t2 = DeadLatentTracker(3)
    t2.load_state_dict(t.state_dict())
    assert torch.equal(t2.tokens_since_fired, t.tokens_since_fired)


def test_auxk_loss_matches_slow_computation_and_has_straight_through_gradient():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(6, 10, generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(6, 4, generator=g, dtype=torch.float64)
    dead = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    k = 3
    loss = auxk_loss(pre, e, W_dec, dead, k)
    # slow: per row, the k largest pre-activations among dead latents, ReLU, unit decoder rows
    dirs = (W_dec / W_dec.norm(dim=1, keepdim=True)).detach().numpy()
    p = pre.detach().numpy()
    dead_idx = np.flatnonzero(dead.numpy())
    sq = 0.0
    for b in range(6):
        chosen = dead_idx[np.argsort(-p[b, dead_idx])[:k]]
        e_hat = sum(max(p[b, i], 0.0) * dirs[i] for i in chosen)
        sq += np.sum((e.numpy()[b] - e_hat) ** 2)
    expected = sq / np.sum((e.numpy() - e.numpy().mean(0)) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    grad = pre.grad
    assert torch.all(grad[:, ~dead] == 0)  # live latents get nothing
    chosen_neg = (grad != 0) & (pre.detach() < 0)
    assert chosen_neg.any()  # negative (ReLU-dead) pre-activations still get a gradient
    assert (W_dec.grad[~dead] == 0).all()


# ------------------------------------------------------------------------------------ config
def test_train_config_documents_every_field_and_checks_values():
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert field_help(TrainConfig, f.name), f.name
    cfg = config_from_dict(TrainConfig, {"lr": "1e-3", "lr_decay": "cosine", "n_steps": 5})
    assert cfg.lr == 1e-3 and cfg.n_steps == 5
    with pytest.raises(ConfigError, match="lr_decay"):
        config_from_dict(TrainConfig, {"lr_decay": "exp"})
    for bad in ({"lr": 0.0}, {"n_steps": 0}, {"adam_beta2": 1.0}, {"sparsity_coef": -1.0},
                {"lr_decay_frac": 1.5}, {"dead_window": 0}, {"grad_clip": float("nan")}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


@pytest.mark.parametrize("kind", ["coder", "clt"])
def test_threshold_lr_scale_multiplies_only_the_thresholds_steps(kind: str):
    from mechfaith.coders import CoderConfig, SparseCoder
    from mechfaith.coders.clt import CrossLayerTranscoder
    from mechfaith.coders.clt_config import CLTConfig
    from mechfaith.training import Trainer
    from mechfaith.training.clt_trainer import CLTTrainer

    g = torch.Generator().manual_seed(0)
    shape = (2, 64, 6) if kind == "clt" else (64, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.tanh(x)
    runs = {}
    for scale in (1.0, 10.0):
        # lr warm-up on: the thresholds' learning rate stays `scale` times the others' at every step
        tcfg = TrainConfig(n_steps=3, lr=1e-3, lr_warmup_steps=4, sparsity="l0", sparsity_coef=1.0,
                           threshold_lr_scale=scale, auxk_coef=0.0)
        if kind == "clt":
            m = CrossLayerTranscoder(CLTConfig(n_layers=2, d_in=6, n_latents=16, activation="jumprelu",
                                               jumprelu_threshold=0.3, jumprelu_bandwidth=2.0),
                                     generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            tr = CLTTrainer(m, tcfg, progress=False)
        else:
            m = SparseCoder(CoderConfig(d_in=6, n_latents=16, activation="jumprelu", jumprelu_threshold=0.3,
                                        jumprelu_bandwidth=2.0),
                            generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            tr = Trainer(m, tcfg, progress=False)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        tr.step(x, y)  # one step: Adam's first update is lr * g / (|g| + eps), linear in the group's lr
        runs[scale] = {n: p.detach() - before[n] for n, p in m.named_parameters()}
        assert tr.optimizer.param_groups[-1]["lr"] == pytest.approx(scale * 1e-3 / 4)
    d1, d10 = runs[1.0], runs[10.0]
    assert float(d1["log_threshold"].abs().max()) > 0
    torch.testing.assert_close(d10["log_threshold"], 10 * d1["log_threshold"], rtol=1e-9, atol=1e-15)
    for name in d1:
        if name != "log_threshold":
            torch.testing.assert_close(d10[name], d1[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ConfigError, match="threshold_lr_scale"):
        TrainConfig(threshold_lr_scale=0.0)
