"""The trainer: learning, loss terms, metrics, logs, decoder norms, AuxK, Jacobian matching, NaN guard."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mechfaith.coders import CoderConfig, build_coder
from mechfaith.coders.files import load_coder
from mechfaith.errors import ConfigError, InputError, TrainingDiverged
from mechfaith.training import FunctionStream, IterableStream, TensorStream, TrainConfig, Trainer, load_checkpoint
from mechfaith.training import checkpoint as ckpt
from mechfaith.training.schedules import lr_at, sparsity_coef_at

D, N_FEAT = 16, 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids thread-pool contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _features() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(N_FEAT, D, generator=g)
    return f / f.norm(dim=1, keepdim=True)


FEATURES = _features()


def sparse_data(gen: torch.Generator, b: int) -> torch.Tensor:
    """Rows that are sparse non-negative combinations of 32 fixed unit directions in R^16."""
    act = (torch.rand(b, N_FEAT, generator=gen) < 0.06) * torch.rand(b, N_FEAT, generator=gen)
    return act @ FEATURES


def sae(seed: int = 0, n: int = 64, **kw):
    return build_coder(CoderConfig(d_in=D, n_latents=n, kind="sae", **kw), seed=seed)


def gelu_mlp(d: int = 6, hidden: int = 24, scale: float = 4.0) -> torch.nn.Module:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d))
    with torch.no_grad():
        mlp[2].weight.mul_(scale)
    return mlp


def sparse_inputs(gen: torch.Generator, b: int, d: int = 6):
    return torch.randn(b, d, generator=gen) * (torch.rand(b, d, generator=gen) < 0.3), None


# ------------------------------------------------------------------------------------ learning
def test_sae_on_sparse_synthetic_features_reaches_high_fve(tmp_path: Path):
    coder = sae()
    cfg = TrainConfig(n_steps=1200, lr=3e-3, lr_warmup_steps=50, sparsity="l1", sparsity_coef=3e-3,
                      log_every=200, dead_window=50_000)
    res = Trainer(coder, cfg, log_path=tmp_path / "log.jsonl", progress=False).fit(
        FunctionStream(sparse_data, batch_size=256))
    assert res.status == "completed" and res.steps_done == 1200 and res.tokens_seen == 1200 * 256
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < 0.05 * lines[0]["loss"]
    # held-out data
    x = sparse_data(torch.Generator().manual_seed(123), 4096)
    with torch.no_grad():
        x_hat = coder(x)
    fve = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fve > 0.9
    assert res.final_metrics["fve"] > 0.9
    assert res.final_metrics["l0"] < 40  # sparse (64 latents)


def test_jsonl_log_lines_parse_and_hold_the_metrics(tmp_path: Path):
    cfg = TrainConfig(n_steps=25, lr=1e-3, log_every=10, sparsity="tanh_l1", sparsity_coef=0.01)
    log_path = tmp_path / "sub" / "train.jsonl"
    Trainer(sae(), cfg, log_path=log_path, progress=False).fit(FunctionStream(sparse_data, batch_size=32))
    raw = log_path.read_text()
    assert raw.endswith("\n")
    lines = [json.loads(line) for line in raw.splitlines()]
    assert [r["step"] for r in lines] == [1, 10, 20, 25]  # the first, every 10th, the last
    for r in lines:
        for key in ("step", "tokens", "lr", "loss", "recon", "sparsity", "mse", "fve", "l0",
                    "dead_frac", "elapsed", "grad_norm"):
            assert isinstance(r[key], (int, float)), key
        assert r["event"] == "train"
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg))
    assert lines[-1]["elapsed"] >= lines[0]["elapsed"]


def test_step_metrics_match_a_manual_computation():
    torch.manual_seed(0)
    coder = build_coder(CoderConfig(d_in=5, n_latents=12, d_out=3), seed=1)
    before = copy.deepcopy(coder)
    x, y = torch.randn(20, 5), torch.randn(20, 3)
    cfg = TrainConfig(n_steps=10, sparsity="l1", sparsity_coef=0.2, sparsity_warmup_steps=4,
                      dead_window=1000, auxk_coef=0.0)
    rec = Trainer(coder, cfg, progress=False).step(x, y)
    with torch.no_grad():
        out = before.forward_full(x)
        yn, hn, f = y.numpy(), out.y_hat.numpy(), out.f.numpy()
        l1 = float((out.f @ before.W_dec.norm(dim=1)).mean())
    recon = np.sum((hn - yn) ** 2) / 20
    assert rec["recon"] == pytest.approx(recon, rel=1e-5)
    assert rec["mse"] == pytest.approx(np.mean((hn - yn) ** 2), rel=1e-5)
    assert rec["fve"] == pytest.approx(1 - np.sum((hn - yn) ** 2) / np.sum((yn - yn.mean(0)) ** 2), rel=1e-5)
    assert rec["l0"] == pytest.approx(np.count_nonzero(f) / 20)
    assert rec["sparsity"] == pytest.approx(l1, rel=1e-5)
    assert rec["sparsity_coef"] == pytest.approx(0.05)  # warm-up: 1/4 of 0.2 at the first step
    assert rec["loss"] == pytest.approx(recon + 0.05 * l1, rel=1e-5)
    assert rec["dead_frac"] == 0.0 and rec["step"] == 1 and rec["tokens"] == 20


def test_sparsity_warmup_reaches_the_loss():
    cfg = TrainConfig(n_steps=8, lr=1e-4, sparsity="l1", sparsity_coef=0.3, sparsity_warmup_steps=6,
                      log_every=1, auxk_coef=0.0)
    trainer = Trainer(sae(), cfg, progress=False)
    stream = FunctionStream(sparse_data, batch_size=64)
    for i in range(8):
        rec = trainer.step(*stream.next_batch())
        assert rec["sparsity_coef"] == pytest.approx(sparsity_coef_at(i, cfg))
        assert rec["loss"] == pytest.approx(rec["recon"] + rec["sparsity_coef"] * rec["sparsity"], rel=1e-5)
    assert sparsity_coef_at(0, cfg) == pytest.approx(0.05) and sparsity_coef_at(7, cfg) == 0.3


def test_plain_steps_sync_nothing_but_loss_and_grad_norm():
    trainer = Trainer(sae(), TrainConfig(n_steps=100, log_every=50), progress=False)
    stream = FunctionStream(sparse_data, batch_size=16)
    trainer.step(*stream.next_batch())  # step 1 is a log step
    rec = trainer.step(*stream.next_batch())
    assert set(rec) == {"step", "tokens", "lr", "sparsity_coef", "loss", "grad_norm"}
    assert set(trainer.step(*stream.next_batch(), metrics=True)) >= {"mse", "fve", "l0", "dead_frac"}


# ------------------------------------------------------------------------------------ decoder norms
def test_unit_decoder_norm_stays_unit_and_penalty_norms_move():
    stream_cfg = dict(n_steps=150, lr=1e-2, lr_warmup_steps=0, sparsity="l1", sparsity_coef=0.05)
    unit = sae(decoder_norm="unit")
    with torch.no_grad():
        unit.W_dec.mul_(3.0)  # the trainer renormalises at the start as well
    Trainer(unit, TrainConfig(**stream_cfg), progress=False).fit(FunctionStream(sparse_data, batch_size=64))
    assert torch.allclose(unit.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    free = sae(decoder_norm="penalty")
    Trainer(free, TrainConfig(**stream_cfg), progress=False).fit(FunctionStream(sparse_data, batch_size=64))
    assert (free.W_dec.norm(dim=1) - 1).abs().max() > 0.05  # rows are free here


def test_unit_norm_removes_the_parallel_gradient_before_the_step():
    coder = sae(decoder_norm="unit")
    trainer = Trainer(coder, TrainConfig(n_steps=5, lr=1e-3, auxk_coef=0.0), progress=False)
    seen = {}

    orig = trainer.optimizer.step

    def spy(*a, **k):
        g, w = coder.W_dec.grad, coder.W_dec.detach()
        seen["parallel"] = (g * w).sum(dim=1).abs().max().item()
        seen["grad"] = g.abs().max().item()
        return orig(*a, **k)

    trainer.optimizer.step = spy
    trainer.step(sparse_data(torch.Generator().manual_seed(0), 64))
    assert seen["grad"] > 0 and seen["parallel"] < 1e-6 * max(1.0, seen["grad"])


# ------------------------------------------------------------------------------------ dead latents
def test_auxk_brings_dead_latents_back():
    def run(auxk_coef: float) -> float:
        coder = sae()
        with torch.no_grad():
            coder.b_enc[:48] = -5.0  # 48 of 64 latents never fire
        cfg = TrainConfig(n_steps=600, lr=3e-3, lr_warmup_steps=0, lr_decay="none", sparsity="l1",
                          sparsity_coef=3e-3, log_every=600, dead_window=1024, auxk_coef=auxk_coef,
                          auxk_k=16)
        res = Trainer(coder, cfg, progress=False).fit(FunctionStream(sparse_data, batch_size=256))
        assert res.final_metrics["fve"] > 0.9
        x = sparse_data(torch.Generator().manual_seed(5), 8192)
        with torch.no_grad():
            return float((coder.encode(x) > 0).any(dim=0).float().mean())  # fraction alive

    alive_without, alive_with = run(0.0), run(1 / 32)
    assert alive_without == pytest.approx(0.25)  # nothing revives them without AuxK
    assert alive_with > alive_without + 0.15


# ------------------------------------------------------------------------------------ Jacobian matching
def test_jacobian_term_gradient_reaches_only_the_coder_weights():
    ref = gelu_mlp()
    for p in ref.parameters():
        assert p.requires_grad
    coder = build_coder(CoderConfig(d_in=6, n_latents=20), seed=0)
    cfg = TrainConfig(jacobian_coef=1.0, n_probes=3, sparsity="none", auxk_coef=0.0)
    trainer = Trainer(coder, cfg, ref, progress=False)
    x = torch.randn(32, 6, requires_grad=True)
    terms = trainer.compute_losses(x)
    assert terms.jacobian is not None and terms.jacobian.requires_grad
    named = dict(coder.named_parameters())
    inputs = list(named.values()) + list(ref.parameters()) + [x]
    grads = torch.autograd.grad(terms.jacobian, inputs, allow_unused=True)
    by_name = dict(zip(list(named) + [f"ref{i}" for i in range(4)] + ["x"], grads))
    assert by_name["W_enc"] is not None and by_name["W_enc"].abs().sum() > 0
    assert by_name["W_dec"] is not None and by_name["W_dec"].abs().sum() > 0
    for name, g in by_name.items():
        if name not in ("W_enc", "W_dec"):
            assert g is None or torch.count_nonzero(g) == 0, name
    # a full step leaves the reference and the inputs untouched
    trainer.step(x)
    assert all(p.grad is None for p in ref.parameters()) and x.grad is None


def test_jacobian_matching_uses_the_reference_primal_as_target():
    ref = gelu_mlp()
    coder = build_coder(CoderConfig(d_in=6, n_latents=20), seed=0)
    x = torch.randn(16, 6)
    terms = Trainer(coder, TrainConfig(jacobian_coef=1.0, sparsity="none"), ref,
                    progress=False).compute_losses(x)
    with torch.no_grad():
        assert torch.allclose(terms.target, ref(x), atol=1e-6)
        assert torch.allclose(terms.recon, ((coder(x) - ref(x)) ** 2).sum() / 16, rtol=1e-5)


def test_jacobian_matching_reduces_the_jacobian_error_against_a_gelu_mlp():
    ref = gelu_mlp()
    xt = sparse_inputs(torch.Generator().manual_seed(9), 512)[0]
    j_ref = torch.func.vmap(torch.func.jacrev(ref))(xt).detach()

    def jac_error(jacobian_coef: float) -> float:
        coder = build_coder(CoderConfig(d_in=6, n_latents=48), seed=0)
        cfg = TrainConfig(n_steps=400, lr=1e-2, lr_warmup_steps=20, sparsity="l1", sparsity_coef=1e-3,
                          jacobian_coef=jacobian_coef, log_every=400, auxk_coef=0.0)
        res = Trainer(coder, cfg, ref, progress=False).fit(FunctionStream(sparse_inputs, batch_size=256))
        assert res.final_metrics["fve"] > 0.85
        j = coder.jacobian(xt).detach()
        return float((j - j_ref).pow(2).sum((1, 2)).mean() / j_ref.pow(2).sum((1, 2)).mean())

    plain, matched = jac_error(0.0), jac_error(1.0)
    assert matched < 0.8 * plain


def test_jacobian_contribution_penalty_is_in_the_loss():
    coder = build_coder(CoderConfig(d_in=6, n_latents=20), seed=0)
    x, y = torch.randn(16, 6), torch.randn(16, 6)
    cfg = TrainConfig(sparsity="none", jacobian_contribution_coef=0.5, auxk_coef=0.0)
    terms = Trainer(coder, cfg, progress=False).compute_losses(x, y)
    with torch.no_grad():
        out = coder.forward_full(x)
        w = coder.W_enc.norm(dim=0) * coder.W_dec.norm(dim=1)
        expected = (out.mask.float() * w).sum(1).mean()
    assert terms.jacobian_contribution.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms.total.item() == pytest.approx(terms.recon.item() + 0.5 * expected.item(), rel=1e-5)


# ------------------------------------------------------------------------------------ NaN guard
def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_nan_from_the_reference_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    ref = gelu_mlp()
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        out = ref(x)
        return out * float("nan") if calls["n"] == 7 else out

    coder = build_coder(CoderConfig(d_in=6, n_latents=20), seed=0)
    cfg = TrainConfig(n_steps=20, lr=1e-3, checkpoint_every=3, log_every=1)
    trainer = Trainer(coder, cfg, flaky, log_path=tmp_path / "log.jsonl", checkpoint_dir=tmp_path / "ckpt",
                      progress=False)
    res = trainer.fit(FunctionStream(sparse_inputs, batch_size=32))
    assert res.status == "diverged" and not res.ok
    assert res.steps_done == 6 and "step 7" in res.message
    c = load_checkpoint(tmp_path / "ckpt")
    assert c.step == 6
    assert all(torch.isfinite(t).all() for t in c.coder.state_dict().values())
    # nothing was updated by the bad step: the coder in memory equals the checkpoint
    for a, b in zip(c.coder.state_dict().values(), coder.state_dict().values()):
        assert torch.equal(a, b)
    assert _no_temporaries(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "diverged" and lines[-1]["step"] == 7
    assert res.final_metrics["step"] == 6


def test_huge_learning_rate_diverges_and_the_last_checkpoint_is_finite(tmp_path: Path):
    coder = build_coder(CoderConfig(d_in=6, n_latents=20), seed=0)
    cfg = TrainConfig(n_steps=50, lr=1e30, lr_warmup_steps=0, checkpoint_every=1, sparsity="none")
    res = Trainer(coder, cfg, gelu_mlp(), checkpoint_dir=tmp_path / "ckpt", progress=False).fit(
        FunctionStream(sparse_inputs, batch_size=32))
    assert res.status == "diverged" and res.steps_done < 50
    c = load_checkpoint(tmp_path / "ckpt")
    assert all(torch.isfinite(t).all() for t in c.coder.state_dict().values())
    assert all(torch.isfinite(t).all() for t in c.optimizer_state.values())
    assert _no_temporaries(tmp_path)
    load_coder(tmp_path / "ckpt" / ckpt.CODER_DIR)


def test_step_raises_training_diverged_without_changing_anything():
    coder = build_coder(CoderConfig(d_in=6, n_latents=20), seed=0)
    trainer = Trainer(coder, TrainConfig(), lambda x: torch.full((x.shape[0], 6), float("inf")),
                      progress=False)
    before = copy.deepcopy(coder.state_dict())
    with pytest.raises(TrainingDiverged, match="step 1"):
        trainer.step(torch.randn(8, 6))
    assert trainer.step_count == 0 and not trainer.optimizer.state
    for k, v in coder.state_dict().items():
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------------------------ inputs
def test_bad_batches_raise_input_errors_naming_the_step():
    coder = build_coder(CoderConfig(d_in=6, n_latents=20), seed=0)
    good = torch.randn(8, 6)
    bad = good.clone()
    bad[3, 2] = float("nan")
    batches = [(good, good), (good, good), (bad, good)]
    trainer = Trainer(coder, TrainConfig(n_steps=5), progress=False)
    with pytest.raises(InputError, match="step 3.*NaN"):
        trainer.fit(IterableStream(batches))
    assert trainer.step_count == 2
    with pytest.raises(InputError, match="NaN or inf in y"):
        trainer.step(good, bad)
    with pytest.raises(InputError, match=r"d_in"):
        trainer.step(torch.randn(8, 5), good)
    with pytest.raises(InputError, match="floating"):
        trainer.step(torch.ones(8, 6, dtype=torch.int64), good)
    with pytest.raises(InputError, match="y has shape"):
        trainer.step(good, torch.randn(7, 6))
    with pytest.raises(InputError, match="no target"):
        trainer.step(good)
    with pytest.raises(InputError, match="reference returned"):
        Trainer(coder, TrainConfig(), lambda x: x[:, :2], progress=False).step(good)


def test_trainer_config_errors():
    relu = build_coder(CoderConfig(d_in=6, n_latents=20), seed=0)
    with pytest.raises(ConfigError, match="reference"):
        Trainer(relu, TrainConfig(jacobian_coef=1.0))
    with pytest.raises(ConfigError, match="JumpReLU"):
        Trainer(relu, TrainConfig(sparsity="l0"))
    with pytest.raises(ConfigError, match="device"):
        Trainer(relu, TrainConfig(device="nonsense"))


def test_l0_penalty_trains_jumprelu_thresholds():
    coder = build_coder(CoderConfig(d_in=D, n_latents=32, kind="sae", activation="jumprelu",
                                    jumprelu_threshold=0.05, jumprelu_bandwidth=0.05), seed=0)
    before = coder.log_threshold.detach().clone()
    cfg = TrainConfig(n_steps=30, lr=1e-2, sparsity="l0", sparsity_coef=0.1)
    res = Trainer(coder, cfg, progress=False).fit(FunctionStream(sparse_data, batch_size=128))
    assert res.status == "completed"
    assert not torch.equal(before, coder.log_threshold.detach())


# ------------------------------------------------------------------------------------ loop
def test_stream_that_ends_early_and_tensor_stream_targets():
    x = torch.randn(64, D)
    trainer = Trainer(sae(), TrainConfig(n_steps=10, log_every=2), progress=False)
    res = trainer.fit(IterableStream([(x[:16], None)] * 3))
    assert res.status == "completed" and res.stream_exhausted and res.steps_done == 3
    assert "ended" in res.message
    coder = build_coder(CoderConfig(d_in=D, n_latents=32, d_out=4), seed=0)
    y = torch.randn(64, 4)
    res = Trainer(coder, TrainConfig(n_steps=10), progress=False).fit(TensorStream(x, y, batch_size=16))
    assert res.steps_done == 10 and not res.stream_exhausted


def test_progress_bar_shows_rate_and_eta(capsys):
    Trainer(sae(), TrainConfig(n_steps=5, log_every=1), desc="demo").fit(
        FunctionStream(sparse_data, batch_size=16))
    err = capsys.readouterr().err
    assert "demo" in err and "5/5" in err and ("step/s" in err or "s/step" in err)
    assert "<" in err  # elapsed<remaining
    Trainer(sae(), TrainConfig(n_steps=5), progress=False).fit(FunctionStream(sparse_data, batch_size=16))
    assert capsys.readouterr().err == ""


def test_on_log_callback_sees_each_record():
    seen = []
    Trainer(sae(), TrainConfig(n_steps=6, log_every=3), progress=False).fit(
        FunctionStream(sparse_data, batch_size=16), on_log=seen.append)
    assert [r["step"] for r in seen] == [1, 3, 6] and all("fve" in r for r in seen)


def test_save_checkpoint_refuses_non_finite_weights(tmp_path: Path):
    coder = sae()
    trainer = Trainer(coder, TrainConfig(), progress=False)
    with torch.no_grad():
        coder.b_dec[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="not finite"):
        trainer.save_checkpoint(folder=tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_with_jacobian_matching_and_resumes(tmp_path: Path):
    ref = gelu_mlp().cuda()
    coder = build_coder(CoderConfig(d_in=6, n_latents=48), seed=0)
    cfg = TrainConfig(n_steps=40, lr=1e-2, jacobian_coef=1.0, device="cuda", checkpoint_every=20,
                      dead_window=512)
    trainer = Trainer(coder, cfg, ref, checkpoint_dir=tmp_path / "c", progress=False)
    res = trainer.fit(FunctionStream(sparse_inputs, batch_size=64))
    assert res.status == "completed" and coder.W_enc.is_cuda
    resumed = build_coder(CoderConfig(d_in=6, n_latents=48), seed=1)
    t2 = Trainer(resumed, cfg, ref, checkpoint_dir=tmp_path / "c", progress=False)
    t2.load_checkpoint()
    assert t2.step_count == 40
    assert torch.allclose(resumed.W_enc, coder.W_enc)
