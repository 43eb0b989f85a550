"""Bad contents in a coder folder (issue 15): every case is refused with one CoderFileError line
naming the file, never a traceback, never accepted silently."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder, build_coder
from mechfaith.coders.files import CONFIG_NAME, WEIGHTS_NAME, load_coder, read_json, read_tensors, save_coder, write_tensors
from mechfaith.coders.validate import check_fields, check_tensor
from mechfaith.errors import CoderFileError
from mechfaith.jsonio import write_json
from mechfaith.lm.coder_files import open_coder


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    coder = build_coder(CoderConfig(d_in=6, n_latents=10, d_out=4, activation="jumprelu", skip=True), seed=0)
    return save_coder(coder, tmp_path / "coder", training={"model": "tiny", "layer": 1})


def refused(folder: Path, where: Path, *words: str, load: Callable[[Path], Any] = load_coder) -> str:
    with pytest.raises(CoderFileError) as exc:
        load(folder)
    msg = str(exc.value)
    assert "\n" not in msg and str(where) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def edit_meta(folder: Path, edit: Callable[[dict], None]) -> None:
    meta = read_json(folder / CONFIG_NAME)
    edit(meta)
    write_json(folder / CONFIG_NAME, meta)


def edit_weights(folder: Path, edit: Callable[[dict], None]) -> None:
    tensors = read_tensors(folder / WEIGHTS_NAME)
    edit(tensors)
    digest = write_tensors(folder / WEIGHTS_NAME, tensors)
    edit_meta(folder, lambda m: m.__setitem__("weights_sha256", digest))


# ---------------------------------------------------------------- JSON
@pytest.mark.parametrize("depth", [100_000, 950, 65])
def test_deeply_nested_config_is_one_line(saved: Path, depth: int) -> None:
    (saved / CONFIG_NAME).write_text("[" * depth + "]" * depth, encoding="utf-8")
    refused(saved, saved / CONFIG_NAME, "nested deeper than 64 levels")
    refused(saved, saved / CONFIG_NAME, "nested deeper than 64 levels", load=open_coder)


def test_deeply_nested_training_summary_is_one_line(saved: Path) -> None:
    text = (saved / CONFIG_NAME).read_text(encoding="utf-8")
    meta = json.loads(text)
    meta["training"] = {"deep": "PLACEHOLDER"}
    text = json.dumps(meta).replace('"PLACEHOLDER"', "[" * 5000 + "]" * 5000)
    (saved / CONFIG_NAME).write_text(text, encoding="utf-8")
    refused(saved, saved / CONFIG_NAME, "nested deeper than 64 levels", load=open_coder)


@pytest.mark.parametrize("field,value,words", [
    ("training", "x", ("'training' must be a JSON object or null", "'x'")),
    ("training", [1, 2], ("'training' must be a JSON object or null",)),
    ("config", "x", ("'config' must be a JSON object",)),
    ("weights_sha256", ["ab"], ("'weights_sha256' must be a string",)),
    ("weights_sha256", "abc", ("'weights_sha256' is not a SHA-256",)),
])
def test_config_fields_of_the_wrong_type(saved: Path, field: str, value: Any, words: tuple[str, ...]) -> None:
    edit_meta(saved, lambda m: m.__setitem__(field, value))
    refused(saved, saved / CONFIG_NAME, *words)
    refused(saved, saved / CONFIG_NAME, *words, load=open_coder)


@pytest.mark.parametrize("field,value,words", [
    ("k", "abc", ("CoderConfig.k", "'abc' is not a valid int")),
    ("k", None, ("CoderConfig.k must not be None",)),
    ("activation", ["relu"], ("CoderConfig.activation", "not a valid str")),
    ("kind", {"a": 1}, ("CoderConfig.kind", "not a valid str")),
])
def test_coder_config_values_of_the_wrong_type(saved: Path, field: str, value: Any, words: tuple[str, ...]) -> None:
    edit_meta(saved, lambda m: m["config"].__setitem__(field, value))
    refused(saved, saved / CONFIG_NAME, "bad config", *words)


@pytest.mark.parametrize("field,value", [("d_in", 1e300), ("n_latents", 10 ** 30), ("d_out", 2 ** 70)])
def test_absurd_sizes_in_the_config_are_one_line(saved: Path, field: str, value: Any) -> None:
    edit_meta(saved, lambda m: m["config"].__setitem__(field, value))
    msg = refused(saved, saved / WEIGHTS_NAME, "has shape", "the config implies (")
    assert len(msg) < len(str(saved)) + 200


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("skip", [False, True])
def test_state_shapes_are_those_of_a_real_coder(activation: str, skip: bool) -> None:
    cfg = CoderConfig(d_in=6, n_latents=10, d_out=4, activation=activation, k=2, skip=skip)
    real = {k: tuple(v.shape) for k, v in SparseCoder(cfg).state_dict().items()}
    assert SparseCoder.state_shapes(cfg) == real


def test_huge_sizes_in_the_config_allocate_nothing(saved: Path) -> None:
    """A config claiming a 10^6 x 10^7 coder is compared with the file's tensors before any
    memory is allocated for the coder (40 TB if it were)."""
    edit_meta(saved, lambda m: m["config"].update(d_in=1_000_000, n_latents=10_000_000, d_out=1_000_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(saved, saved / WEIGHTS_NAME, "has shape", "the config implies (10000000, 1000000)")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB


def test_training_summary_fields_of_the_wrong_type(saved: Path) -> None:
    edit_meta(saved, lambda m: m["training"].__setitem__("layer", "one"))
    refused(saved, saved / CONFIG_NAME, "'layer' must be an integer or null", load=open_coder)
    edit_meta(saved, lambda m: m["training"].update(layer=1, corpus="x"))
    refused(saved, saved / CONFIG_NAME, "'corpus' must be a JSON object or null", load=open_coder)


def test_config_without_its_checksum_is_refused(saved: Path) -> None:
    edit_meta(saved, lambda m: m.pop("weights_sha256"))
    refused(saved, saved / CONFIG_NAME, "'weights_sha256' is missing")


# ---------------------------------------------------------------- tensors
@pytest.mark.parametrize("name,value,words", [
    ("W_enc", torch.full((6, 10), float("nan")), ("tensor W_enc holds 60 non-finite", "60 NaN")),
    ("b_dec", torch.tensor([0.0, float("inf"), float("-inf"), 0.0]), ("tensor b_dec holds 2 non-finite", "2 infinite")),
    ("log_threshold", torch.full((10,), float("-inf")), ("tensor log_threshold holds 10 non-finite",)),
    ("W_skip", torch.zeros(6, 4).half().masked_fill(torch.eye(6, 4, dtype=torch.bool), float("nan")),
     ("tensor W_skip holds 4 non-finite",)),
    ("W_enc", torch.zeros(6, 10, dtype=torch.int32), ("tensor W_enc has dtype int32", "floating point")),
    ("b_enc", torch.zeros(10, dtype=torch.int64), ("tensor b_enc has dtype int64",)),
    ("b_enc", torch.zeros(10, dtype=torch.bool), ("tensor b_enc has dtype bool",)),
    ("W_dec", torch.full((10, 4), 0.1, dtype=torch.float64), ("tensor W_dec is float64", "float32 cannot hold")),
    ("W_dec", torch.full((10, 4), 1e300, dtype=torch.float64), ("tensor W_dec is float64",)),
    ("b_enc", torch.zeros(1, 10), ("tensor b_enc has shape (1, 10)", "the config implies (10,)")),
    ("W_enc", torch.zeros(60), ("tensor W_enc has shape (60,)", "(6, 10)")),
])
def test_bad_weights_are_refused(saved: Path, name: str, value: torch.Tensor, words: tuple[str, ...]) -> None:
    edit_weights(saved, lambda t: t.__setitem__(name, value))
    refused(saved, saved / WEIGHTS_NAME, *words)


def test_exact_float64_and_half_weights_load_as_float32(saved: Path) -> None:
    want = load_coder(saved).state_dict()
    edit_weights(saved, lambda t: t.update(W_enc=t["W_enc"].double(), W_dec=t["W_dec"].half().double(),
                                           b_dec=t["b_dec"].bfloat16()))
    got = load_coder(saved).state_dict()
    assert all(v.dtype == torch.float32 for v in got.values())
    assert torch.equal(got["W_enc"], want["W_enc"])
    assert torch.equal(got["W_dec"], want["W_dec"].half().float())


# ---------------------------------------------------------------- the validation layer itself
def test_check_fields_and_check_tensor_name_the_problem(tmp_path: Path) -> None:
    where = tmp_path / "f.json"
    check_fields(where, {"a": 1, "b": None, "c": 2.5}, {"a": "int", "b": "str|null", "c": "number"}, required=("a",))
    with pytest.raises(CoderFileError, match="'a' is missing"):
        check_fields(where, {}, {"a": "int"}, required=("a",))
    with pytest.raises(CoderFileError, match="'a' must be an integer, got True"):
        check_fields(where, {"a": True}, {"a": "int"})
    with pytest.raises(CoderFileError, match="'c' must be a finite number"):
        check_fields(where, {"c": float("nan")}, {"c": "number"})
    with pytest.raises(CoderFileError, match="threshold holds values below 0"):
        check_tensor(where, "threshold", torch.tensor([0.5, -0.1]), min_value=0.0)
    with pytest.raises(CoderFileError, match="x has 2 dimension"):
        check_tensor(where, "x", torch.zeros(2, 2), rank=1)


def test_the_command_line_reports_each_family_in_one_line(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mechfaith.cli.main import main

    (saved / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    assert main(["inspect", str(saved)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mechfaith: error: ") and "nested deeper" in err[0], err
