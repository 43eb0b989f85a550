"""Checkpoints: files, validation, and resuming to exactly the uninterrupted result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechfaith.coders import CoderConfig, build_coder
from mechfaith.coders.files import load_coder
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.training import (
    FunctionStream,
    IterableStream,
    TensorStream,
    TrainConfig,
    Trainer,
    is_checkpoint,
    load_checkpoint,
)
from mechfaith.training import checkpoint as ckpt

D_IN, D_OUT, N_LAT = 6, 5, 24


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids thread-pool contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference() -> torch.nn.Module:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.GELU(), torch.nn.Linear(16, D_OUT))
    return mlp


def _cfg(**kw) -> TrainConfig:
    base = dict(n_steps=12, lr=1e-2, lr_warmup_steps=3, lr_decay="cosine", lr_decay_frac=0.5,
                sparsity="tanh_l1", sparsity_coef=0.05, sparsity_warmup_steps=4, jacobian_coef=0.5,
                n_probes=2, jacobian_contribution_coef=0.01, dead_window=32, auxk_coef=0.1,
                auxk_k=4, grad_clip=5.0, log_every=1, checkpoint_every=5, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _coder(seed=0, **kw):
    coder = build_coder(CoderConfig(d_in=D_IN, n_latents=N_LAT, d_out=D_OUT, **kw), seed=seed)
    with torch.no_grad():
        coder.b_enc[:8] = -4.0  # dead from the start, so that AuxK has work to do
    return coder


class Interrupting:
    """Delegates to a stream and raises KeyboardInterrupt when asked for batch number ``at``."""

    def __init__(self, inner, at):
        self.inner, self.at, self.n = inner, at, 0

    def next_batch(self):
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        return self.inner.next_batch()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _fn(gen, b):
    x = torch.randn(b, D_IN, generator=gen) * (torch.rand(b, D_IN, generator=gen) < 0.5)
    return x, None  # the target comes from the reference


def _data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, D_IN, generator=g)
    with torch.no_grad():
        y = _reference()(x)
    return x, y


STREAMS = {
    "tensor": lambda: TensorStream(*_data(), batch_size=8, seed=5),
    "function": lambda: FunctionStream(_fn, batch_size=8, seed=5),
    "iterable": lambda: IterableStream([(xb, None) for xb in _data()[0].split(8)] * 3),
}


@pytest.mark.parametrize("kind", list(STREAMS))
@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path, kind: str, activation: str):
    kw = {"relu": {}, "topk": {"k": 3}, "batchtopk": {"k": 3, "skip": True, "decoder_norm": "unit"},
          "jumprelu": {"jumprelu_threshold": 0.1, "jumprelu_bandwidth": 0.1}}[activation]
    ref = _reference()
    full = _coder(activation=activation, **kw)
    t_full = Trainer(full, _cfg(), ref, log_path=tmp_path / "full.jsonl",
                     checkpoint_dir=tmp_path / "full_ckpt", progress=False)
    res_full = t_full.fit(STREAMS[kind]())
    assert res_full.status == "completed" and res_full.steps_done == 12
    # AuxK and Jacobian matching were really active
    assert any("auxk" in r for r in t_full.metrics_history)
    assert all("jacobian" in r for r in t_full.metrics_history)

    part = _coder(activation=activation, **kw)
    t_part = Trainer(part, _cfg(), ref, log_path=tmp_path / "part.jsonl",
                     checkpoint_dir=tmp_path / "ckpt", progress=False)
    with pytest.raises(KeyboardInterrupt):
        t_part.fit(Interrupting(STREAMS[kind](), at=9))  # dies asking for the 9th batch
    assert load_checkpoint(tmp_path / "ckpt").step == 5  # the last periodic checkpoint

    resumed = _coder(seed=123, activation=activation, **kw)  # other weights: the checkpoint wins
    t_res = Trainer(resumed, _cfg(), ref, log_path=tmp_path / "part.jsonl",
                    checkpoint_dir=tmp_path / "ckpt", progress=False)
    res = t_res.fit(STREAMS[kind](), resume=True)
    assert res.status == "completed" and res.steps_done == 12 and res.tokens_seen == 96
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(t_full.tracker.tokens_since_fired, t_res.tracker.tokens_since_fired)
    # the resumed log holds every step once, with the same losses as the uninterrupted one
    lines = [json.loads(line) for line in (tmp_path / "part.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    full_lines = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [r["loss"] for r in full_lines]


def test_checkpoint_files_and_final_coder(tmp_path: Path):
    coder = _coder()
    t = Trainer(coder, _cfg(n_steps=4, checkpoint_every=0), _reference(), checkpoint_dir=tmp_path / "c",
                progress=False)
    t.fit(FunctionStream(_fn, batch_size=8))
    folder = tmp_path / "c"
    assert is_checkpoint(folder) and not is_checkpoint(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ckpt.CODER_DIR, ckpt.OPTIMIZER_NAME, ckpt.TENSORS_NAME, ckpt.STATE_NAME])
    c = load_checkpoint(folder)
    assert c.step == 4 and c.tokens == 32 and c.train_config == t.cfg
    assert c.stream_state["kind"] == "FunctionStream" and isinstance(c.stream_state["generator"], torch.Tensor)
    assert len(c.metrics) == 4
    loaded = load_coder(folder / ckpt.CODER_DIR)  # a plain coder folder
    for a, b in zip(loaded.state_dict().values(), coder.state_dict().values()):
        assert torch.equal(a, b)
    assert set(c.optimizer_state) >= {"W_enc.exp_avg", "W_enc.exp_avg_sq", "W_enc.step"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_load_checkpoint_rejects_damage(tmp_path: Path):
    t = Trainer(_coder(), _cfg(n_steps=2, checkpoint_every=0), _reference(), checkpoint_dir=tmp_path / "c",
                progress=False)
    t.fit(FunctionStream(_fn, batch_size=8))
    folder = tmp_path / "c"
    with pytest.raises(CoderFileError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(CoderFileError, match="not a checkpoint"):
        load_checkpoint(tmp_path)

    opt = folder / ckpt.OPTIMIZER_NAME
    data = bytearray(opt.read_bytes())
    data[-3] ^= 0xFF
    opt.write_bytes(bytes(data))
    with pytest.raises(CoderFileError, match="checksum"):
        load_checkpoint(folder)

    state_path = folder / ckpt.STATE_NAME
    meta = json.loads(state_path.read_text())
    for change, pattern in (({"format": "other"}, "not a mechfaith checkpoint"),
                            ({"format_version": 99}, "version"),
                            ({"step": -1}, "step"),
                            ({"train_config": {"lr": -1.0}}, "train_config")):
        state_path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(CoderFileError, match=pattern):
            load_checkpoint(folder)
    state_path.write_text("{ not json")
    with pytest.raises(CoderFileError, match="JSON"):
        load_checkpoint(folder)


def test_resume_refuses_another_coder_and_missing_checkpoint(tmp_path: Path):
    t = Trainer(_coder(), _cfg(n_steps=2, checkpoint_every=0), _reference(), checkpoint_dir=tmp_path / "c",
                progress=False)
    t.fit(FunctionStream(_fn, batch_size=8))
    other = build_coder(CoderConfig(d_in=D_IN, n_latents=N_LAT + 1, d_out=D_OUT), seed=0)
    t2 = Trainer(other, _cfg(n_steps=4), _reference(), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="another configuration"):
        t2.fit(FunctionStream(_fn, batch_size=8), resume=True)
    t3 = Trainer(_coder(), _cfg(n_steps=4), _reference(), checkpoint_dir=tmp_path / "none", progress=False)
    with pytest.raises(CoderFileError, match="no checkpoint"):
        t3.fit(FunctionStream(_fn, batch_size=8), resume=True)
    t4 = Trainer(_coder(), _cfg(n_steps=4), _reference(), checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="FunctionStream"):
        t4.fit(TensorStream(*_data(), batch_size=8), resume=True)


def test_resume_auto(tmp_path: Path):
    cfg = _cfg(n_steps=3, checkpoint_every=0)
    t = Trainer(_coder(), cfg, _reference(), checkpoint_dir=tmp_path / "c", progress=False)
    assert t.fit(FunctionStream(_fn, batch_size=8), resume="auto").steps_done == 3  # fresh start
    t2 = Trainer(_coder(), _cfg(n_steps=5, checkpoint_every=0), _reference(), checkpoint_dir=tmp_path / "c",
                 progress=False)
    res = t2.fit(FunctionStream(_fn, batch_size=8), resume="auto")
    assert res.steps_done == 5 and len(t2.metrics_history) == 5  # 3 resumed + 2 new log records
    with pytest.raises(ConfigError, match="auto"):
        t2.fit(FunctionStream(_fn, batch_size=8), resume="yes")


def test_resume_extends_a_finished_run(tmp_path: Path):
    a = _coder()
    Trainer(a, _cfg(n_steps=6, lr_decay="none", checkpoint_every=0), _reference(), progress=False).fit(
        FunctionStream(_fn, batch_size=8))
    b = _coder()
    Trainer(b, _cfg(n_steps=3, lr_decay="none", checkpoint_every=0), _reference(),
            checkpoint_dir=tmp_path / "c", progress=False).fit(FunctionStream(_fn, batch_size=8))
    t = Trainer(b, _cfg(n_steps=6, lr_decay="none", checkpoint_every=0), _reference(),
                checkpoint_dir=tmp_path / "c", progress=False)
    res = t.fit(FunctionStream(_fn, batch_size=8), resume=True)
    assert res.steps_done == 6
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)
