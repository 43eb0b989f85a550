"""Coder files: exact round trips, every kind of damage raises CoderFileError, atomic replacement."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from mechfaith.coders import ACTIVATIONS, CoderConfig, SparseCoder, build_coder, files
from mechfaith.coders.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_coder,
    read_json,
    read_tensors,
    save_coder,
    write_tensors,
)
from mechfaith.errors import CoderFileError
from mechfaith.jsonio import write_json


def make(activation: str = "relu", skip: bool = False, seed: int = 0) -> SparseCoder:
    coder = build_coder(CoderConfig(d_in=6, n_latents=10, d_out=4, activation=activation, k=2,
                                    skip=skip), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in coder.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    if activation == "batchtopk":
        coder.forward_full(torch.randn(16, 6, generator=g))  # sets the inference threshold
        assert float(coder.batchtopk_threshold) >= 0
    return coder


def assert_same(a: SparseCoder, b: SparseCoder) -> None:
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def check_error(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("activation,skip", list(itertools.product(ACTIVATIONS, [False, True])))
def test_round_trip_is_exact(tmp_path: Path, activation: str, skip: bool) -> None:
    coder = make(activation, skip)
    folder = save_coder(coder, tmp_path / "c", training={"steps": 3})
    loaded = load_coder(folder)
    assert_same(coder, loaded)
    x = torch.randn(5, 6)
    coder.eval()
    loaded.eval()
    assert torch.equal(coder(x), loaded(x))
    # either file of the folder is accepted too
    assert_same(coder, load_coder(folder / CONFIG_NAME))
    assert read_json(folder / CONFIG_NAME)["training"] == {"steps": 3}


def test_saving_twice_replaces_and_leaves_no_temporaries(tmp_path: Path) -> None:
    save_coder(make(seed=0), tmp_path / "c")
    second = make(seed=5)
    save_coder(second, tmp_path / "c")
    assert_same(second, load_coder(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert sorted(os.listdir(tmp_path / "c")) == [CONFIG_NAME, WEIGHTS_NAME]


# ---------------------------------------------------------------- damage
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_coder(make("jumprelu", skip=True), tmp_path / "coder")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CoderFileError) as exc:
        load_coder(tmp_path / "nope")
    check_error(exc, tmp_path / "nope", "no such file or folder")


def test_truncated_weights(saved: Path) -> None:
    w = saved / WEIGHTS_NAME
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, w, "checksum mismatch", "truncated or corrupt")


def test_truncated_weights_without_checksum(saved: Path) -> None:
    meta = read_json(saved / CONFIG_NAME)
    del meta["weights_sha256"]
    write_json(saved / CONFIG_NAME, meta)
    w = saved / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CoderFileError) as exc:  # our own format always carries its checksum
        load_coder(saved)
    check_error(exc, saved / CONFIG_NAME, "'weights_sha256' is missing")
    with pytest.raises(CoderFileError) as exc:  # read without one, the damage is still caught
        read_tensors(w)
    check_error(exc, w, "not a readable safetensors file")


def test_corrupted_byte_in_weights(saved: Path) -> None:
    w = saved / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-7] ^= 0x01  # a bit in the last tensor's data: still a valid safetensors file
    w.write_bytes(bytes(data))
    assert set(read_tensors(w)) == set(make("jumprelu", skip=True).state_dict())  # parses fine
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, w, "checksum mismatch")


def test_config_not_json(saved: Path) -> None:
    (saved / CONFIG_NAME).write_text("{ this is not json", encoding="utf-8")
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, saved / CONFIG_NAME, "not valid JSON")


def test_config_not_utf8(saved: Path) -> None:
    (saved / CONFIG_NAME).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, saved / CONFIG_NAME, "not valid JSON")


def test_saelens_folder(tmp_path: Path) -> None:
    folder = tmp_path / "saelens"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 6, "d_sae": 10, "architecture": "standard"}))
    write_tensors(folder / "sae_weights.safetensors", {"W_enc": torch.zeros(6, 10)})
    with pytest.raises(CoderFileError) as exc:
        load_coder(folder)
    check_error(exc, folder, "SAELens")


def test_foreign_json_named_config(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(CoderFileError) as exc:
        load_coder(folder)
    check_error(exc, folder / CONFIG_NAME, "not a mechfaith coder")
    (folder / CONFIG_NAME).write_text("[1, 2, 3]")
    with pytest.raises(CoderFileError) as exc:
        load_coder(folder)
    check_error(exc, folder / CONFIG_NAME, "not a mechfaith coder")


def test_wrong_format_version(saved: Path) -> None:
    meta = read_json(saved / CONFIG_NAME)
    meta["format_version"] = 99
    write_json(saved / CONFIG_NAME, meta)
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, saved / CONFIG_NAME, "format version 99 is not supported")


def test_bad_config_values(saved: Path) -> None:
    meta = read_json(saved / CONFIG_NAME)
    meta["config"]["activation"] = "gelu"
    write_json(saved / CONFIG_NAME, meta)
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, saved / CONFIG_NAME, "bad config", "gelu")


def _rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    digest = write_tensors(folder / WEIGHTS_NAME, tensors)
    meta = read_json(folder / CONFIG_NAME)
    meta["weights_sha256"] = digest
    write_json(folder / CONFIG_NAME, meta)


def test_missing_tensor(saved: Path) -> None:
    tensors = read_tensors(saved / WEIGHTS_NAME)
    del tensors["W_dec"]
    _rewrite_weights(saved, tensors)
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, saved / WEIGHTS_NAME, "missing: ['W_dec']")


def test_unexpected_tensor(saved: Path) -> None:
    tensors = read_tensors(saved / WEIGHTS_NAME)
    tensors["extra"] = torch.zeros(2)
    _rewrite_weights(saved, tensors)
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, saved / WEIGHTS_NAME, "unexpected: ['extra']")


def test_wrong_shape(saved: Path) -> None:
    tensors = read_tensors(saved / WEIGHTS_NAME)
    tensors["W_enc"] = torch.zeros(6, 11)
    _rewrite_weights(saved, tensors)
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, saved / WEIGHTS_NAME, "tensor W_enc has shape (6, 11)", "(6, 10)")


def test_missing_weights_file(saved: Path) -> None:
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(CoderFileError) as exc:
        load_coder(saved)
    check_error(exc, saved / WEIGHTS_NAME, "file not found")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CoderFileError) as exc:
        load_coder(tmp_path / "empty")
    check_error(exc, tmp_path / "empty", f"no {CONFIG_NAME}")


# ---------------------------------------------------------------- atomicity
@pytest.mark.parametrize("fail_in", ["write_json", "save_file"])
def test_failed_save_keeps_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      fail_in: str) -> None:
    old = make(seed=0)
    save_coder(old, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if fail_in == "save_file":
        monkeypatch.setattr(files, "save_file", boom)
    else:
        # the weights are written, then writing the config fails
        monkeypatch.setattr(files, "write_json", boom)
    with pytest.raises(OSError, match="simulated"):
        save_coder(make(seed=7), tmp_path / "c")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary folder or file is left behind
    after = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    assert after == before
    assert_same(old, load_coder(tmp_path / "c"))


def test_failed_swap_keeps_a_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure at the final rename puts the old folder back and leaves no temporaries."""
    old = make(seed=0)
    save_coder(old, tmp_path / "c")
    import mechfaith.atomic as atomic

    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        calls["n"] += 1
        if Path(src).name.endswith(".tmp") and Path(dst).name == "c":
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated"):
        save_coder(make(seed=7), tmp_path / "c")
    monkeypatch.undo()
    assert calls["n"] >= 1
    assert sorted(os.listdir(tmp_path)) == ["c"]  # the old folder is back under its name
    assert_same(old, load_coder(tmp_path / "c"))
