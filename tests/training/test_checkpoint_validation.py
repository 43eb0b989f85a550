"""Damaged checkpoints, impossible resume points and temporaries (issue 15): each refused with one
line naming the file, or cleaned up; a fresh run never leaves an earlier run's checkpoint behind."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mechfaith.atomic import atomic_dir, atomic_path, clean_stale_temps
from mechfaith.coders import CoderConfig, build_coder
from mechfaith.coders.files import CONFIG_NAME, WEIGHTS_NAME, read_tensors, write_tensors
from mechfaith.errors import CoderFileError, ConfigError, MechfaithError
from mechfaith.training import TensorStream, TrainConfig, Trainer, load_checkpoint
from mechfaith.training import checkpoint as ckpt

D = 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trainer(folder: Path, n_steps: int = 8, lr: float = 1e-3, seed: int = 0) -> Trainer:
    coder = build_coder(CoderConfig(d_in=D, n_latents=8), seed=seed)
    cfg = TrainConfig(n_steps=n_steps, checkpoint_every=4, log_every=1, batch_size=8, lr=lr, lr_warmup_steps=0)
    return Trainer(coder, cfg, None, checkpoint_dir=folder / "ckpt", log_path=folder / "log.jsonl", progress=False)


def _stream() -> TensorStream:
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    return TensorStream(x, x, batch_size=8, seed=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    assert _trainer(folder).fit(_stream()).status == "completed"
    return folder


@pytest.fixture
def damaged(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _edit_state(folder: Path, **changes: Any) -> Path:
    path = folder / "ckpt" / ckpt.STATE_NAME
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.update(changes)
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


def _refused(folder: Path, error: type[MechfaithError], *words: str) -> str:
    with pytest.raises(error) as exc:
        _trainer(folder).fit(_stream(), resume=True)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("changes,words", [
    ({"elapsed_s": "abc"}, ("'elapsed_s' must be a number or null", "'abc'")),
    ({"elapsed_s": [1]}, ("'elapsed_s' must be a number or null",)),
    ({"elapsed_s": -5.0}, ("'elapsed_s' must be >= 0",)),
    ({"metrics": [1, "x"]}, ("'metrics' must be a list of JSON objects",)),
    ({"metrics": "x"}, ("'metrics' must be a list or null",)),
    ({"extra": "x"}, ("'extra' must be a JSON object or null",)),
    ({"stream": ["x"]}, ("'stream' must be a JSON object or null",)),
    ({"stream_tensor_keys": [1]}, ("'stream_tensor_keys' must be a list of strings",)),
    ({"tokens": "64"}, ("'tokens' must be an integer",)),
    ({"step": True}, ("'step' must be an integer",)),
    ({"train_config": "x"}, ("'train_config' must be a JSON object",)),
    ({"optimizer_sha256": None}, ("'optimizer_sha256' must be a string",)),
    ({"step": 1_000_000}, ("'step' 1000000 is beyond the run's n_steps 8", "damaged")),
])
def test_damaged_trainer_state_is_one_line(damaged: Path, changes: dict, words: tuple[str, ...]) -> None:
    path = _edit_state(damaged, **changes)
    _refused(damaged, CoderFileError, str(path), *words)


def test_checkpoint_without_its_checksums_is_refused(damaged: Path) -> None:
    path = damaged / "ckpt" / ckpt.STATE_NAME
    meta = json.loads(path.read_text(encoding="utf-8"))
    del meta["state_sha256"]
    path.write_text(json.dumps(meta), encoding="utf-8")
    _refused(damaged, CoderFileError, str(path), "'state_sha256' is missing")


def test_deeply_nested_trainer_state_is_one_line(damaged: Path) -> None:
    path = damaged / "ckpt" / ckpt.STATE_NAME
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    _refused(damaged, CoderFileError, str(path), "nested deeper than 64 levels")


def test_deeply_nested_log_line_is_dropped_like_a_torn_one(damaged: Path) -> None:
    log = damaged / "log.jsonl"
    log.write_text(log.read_text(encoding="utf-8") + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    t = _trainer(damaged, n_steps=10)
    assert t.fit(_stream(), resume=True).steps_done == 10
    steps = [json.loads(line)["step"] for line in log.read_text(encoding="utf-8").splitlines()]
    assert steps == list(range(1, 11))


def test_resume_beyond_this_runs_steps_is_refused(damaged: Path) -> None:
    with pytest.raises(ConfigError, match="at step 8, beyond this run's n_steps 6"):
        _trainer(damaged, n_steps=6).fit(_stream(), resume=True)


@pytest.mark.parametrize("stream,words", [
    ({"kind": "TensorStream", "n_rows": 64, "batch_size": 8, "epoch": "abc", "position": 0}, ("epoch", "integer")),
    ({"kind": "TensorStream", "n_rows": 64, "batch_size": 8, "epoch": 0, "position": 1000}, ("position 1000",)),
])
def test_damaged_stream_state_is_one_line(damaged: Path, stream: dict, words: tuple[str, ...]) -> None:
    _edit_state(damaged, stream=stream)
    _refused(damaged, ConfigError, *words)


def test_damaged_checkpoint_tensors_are_refused(damaged: Path) -> None:
    folder = damaged / "ckpt"
    opt = read_tensors(folder / ckpt.OPTIMIZER_NAME)
    opt["W_enc.exp_avg"][0, 0] = float("nan")
    _edit_state(damaged, optimizer_sha256=write_tensors(folder / ckpt.OPTIMIZER_NAME, opt))
    _refused(damaged, CoderFileError, ckpt.OPTIMIZER_NAME, "W_enc.exp_avg holds 1 non-finite")


def test_negative_dead_counters_are_refused(run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    state = read_tensors(folder / "ckpt" / ckpt.TENSORS_NAME, weights=False)
    state["dead.tokens_since_fired"] = state["dead.tokens_since_fired"].float()
    _edit_state(folder, state_sha256=write_tensors(folder / "ckpt" / ckpt.TENSORS_NAME, state))
    _refused(folder, CoderFileError, "dead.tokens_since_fired must be 8 integers >= 0", "float32")


def test_nan_in_the_checkpoints_coder_is_refused(damaged: Path) -> None:
    coder = damaged / "ckpt" / "coder"
    weights = read_tensors(coder / WEIGHTS_NAME)
    weights["b_enc"][3] = float("inf")
    digest = write_tensors(coder / WEIGHTS_NAME, weights)
    meta = json.loads((coder / CONFIG_NAME).read_text(encoding="utf-8"))
    meta["weights_sha256"] = digest
    (coder / CONFIG_NAME).write_text(json.dumps(meta), encoding="utf-8")
    _refused(damaged, CoderFileError, str(coder / WEIGHTS_NAME), "b_enc holds 1 non-finite")


# ---------------------------------------------------------------- a fresh run into an old run's folder
def test_fresh_run_that_diverges_leaves_its_own_checkpoint_not_the_earlier_one(damaged: Path) -> None:
    assert load_checkpoint(damaged / "ckpt").step == 8
    result = _trainer(damaged, lr=1e30).fit(_stream())  # fresh (no resume), diverges at once
    assert result.status == "diverged" and result.steps_done < 4
    c = load_checkpoint(damaged / "ckpt")
    assert c.step == 0 and c.metrics == []  # this run's step 0, matching its log, not the old step 8
    lines = [json.loads(line) for line in (damaged / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines[-1]["event"] == "diverged" and all(r["step"] <= 2 for r in lines)
    resumed = _trainer(damaged, n_steps=8).fit(_stream(), resume=True)  # resuming continues this run
    assert resumed.status == "completed" and resumed.steps_done == 8


# ---------------------------------------------------------------- temporaries
def _age(path: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (old, old), follow_symlinks=False)


def test_interrupted_checkpoint_writes_are_cleaned_on_the_next_save_and_resume(damaged: Path) -> None:
    stale = damaged / ".ckpt.ab12cd_9.tmp"  # what a write killed by SIGKILL leaves
    (stale / "coder").mkdir(parents=True)
    (stale / "coder" / "weights.safetensors").write_bytes(b"half")
    _age(stale)
    stale_file = damaged / ".log.jsonl.zz99yy88.tmp"
    stale_file.write_text("half")
    _age(stale_file)
    fresh = damaged / ".ckpt.qqqqqqqq.tmp"  # one of a write happening now: kept
    fresh.mkdir()
    other = damaged / ".ckpt.keep.tmp"  # not our pattern: kept, however old
    other.mkdir()
    _age(other)
    _trainer(damaged, n_steps=12).fit(_stream(), resume=True)  # resume, then saves
    names = sorted(p.name for p in damaged.iterdir())
    assert stale.name not in names and stale_file.name not in names
    assert fresh.name in names and other.name in names
    assert not any(n.endswith(".old") for n in names)


def test_clean_stale_temps_only_takes_our_own_old_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "out"
    ours = [tmp_path / ".out.a1b2c3d4.tmp", tmp_path / ".out.a1b2c3d4.safetensors.tmp"]
    theirs = [tmp_path / ".out.old", tmp_path / ".other.a1b2c3d4.tmp", tmp_path / "out.a1b2c3d4.tmp",
              tmp_path / ".out.A1B2C3D4.tmp", tmp_path / ".out.a1b2.tmp"]
    for p in ours + theirs:
        p.write_text("x")
        _age(p)
    busy = tmp_path / ".out.busy0000.tmp"  # an old folder with a file another process is still writing
    busy.mkdir()
    _age(busy)
    (busy / "weights.safetensors").write_bytes(b"growing")
    os.utime(busy, (time.time() - 3600, time.time() - 3600))
    assert sorted(clean_stale_temps(target)) == sorted(ours)
    assert all(p.exists() for p in theirs) and busy.exists()


@pytest.mark.parametrize("writer", ["path", "dir"])
@pytest.mark.parametrize("failure", [OSError, KeyboardInterrupt, SystemExit])
def test_atomic_writers_remove_their_temporaries_on_every_exit(tmp_path: Path, writer: str,
                                                               failure: type[BaseException]) -> None:
    (tmp_path / "t").write_text("old") if writer == "path" else (tmp_path / "t").mkdir()
    with pytest.raises(failure):
        with (atomic_path if writer == "path" else atomic_dir)(tmp_path / "t") as tmp:
            (tmp / "f").write_text("new") if writer == "dir" else tmp.write_text("new")
            raise failure("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert (tmp_path / "t").read_text() == "old" if writer == "path" else not any((tmp_path / "t").iterdir())


def test_atomic_path_cleans_up_when_its_user_made_a_folder(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "f") as tmp:
            tmp.unlink()
            tmp.mkdir()  # e.g. a library that writes a folder where a file was expected
            (tmp / "x").write_text("x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [".", ".."])
def test_atomic_dir_refuses_the_current_folder_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  name: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError):
        with atomic_dir(name):
            pass
    with pytest.raises(ConfigError, match="current folder"):
        with atomic_dir(work):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]
