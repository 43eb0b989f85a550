"""A damaged activation cache (issue 15): a shard of the wrong width, rank or dtype, NaN rows, an
index of the wrong types, a shard entry outside the folder, a bad stream position: each is one line
naming the file, never a traceback deep in the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mechfaith.coders.files import write_tensors
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.jsonio import write_json
from mechfaith.lm.activation_cache import FORMAT, FORMAT_VERSION, INDEX_NAME, ActivationCache, CachedActivationStream

D_IN, D_OUT, ROWS = 6, 4, 10


def make_cache(folder: Path, x: torch.Tensor | None = None, y: torch.Tensor | None = None, **index: Any) -> Path:
    """A one-layer, one-shard cache in the layout write_activation_cache writes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, D_IN, generator=g).half() if x is None else x
    y = torch.randn(ROWS, D_OUT, generator=g).half() if y is None else y
    (folder / "layer_03").mkdir(parents=True)
    digest = write_tensors(folder / "layer_03" / "shard_00000.safetensors", {"x": x, "y": y})
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": [3], "d_in": D_IN, "d_out": D_OUT,
            "n_tokens": ROWS, "dtype": "float16",
            "shards": {"3": [{"file": "layer_03/shard_00000.safetensors", "rows": ROWS, "sha256": digest}]}}
    body.update(index)
    write_json(folder / INDEX_NAME, body)
    return folder


def test_a_valid_hand_made_cache_reads(tmp_path: Path) -> None:
    x, y = ActivationCache(make_cache(tmp_path / "c")).load(3)
    assert x.shape == (ROWS, D_IN) and y.shape == (ROWS, D_OUT) and x.dtype == torch.float32


@pytest.mark.parametrize("x,y,words", [
    (torch.zeros(ROWS, D_IN + 2), None, ("width 8 -> 4", "index says 6 -> 4")),
    (None, torch.zeros(ROWS, D_OUT - 1), ("width 6 -> 3",)),
    (torch.zeros(ROWS * D_IN), None, ("tensor x has 1 dimension",)),
    (torch.zeros(ROWS, D_IN, 1), None, ("tensor x has 3 dimension",)),
    (torch.zeros(ROWS, D_IN, dtype=torch.int16), None, ("tensor x has dtype int16",)),
    (None, torch.full((ROWS, D_OUT), float("nan")), ("tensor y holds 40 non-finite",)),
])
def test_bad_shards_are_one_line(tmp_path: Path, x: torch.Tensor | None, y: torch.Tensor | None,
                                 words: tuple[str, ...]) -> None:
    cache = ActivationCache(make_cache(tmp_path / "c", x, y))
    shard = tmp_path / "c" / "layer_03" / "shard_00000.safetensors"
    for read in (lambda: cache.load(3), lambda: CachedActivationStream(cache, 3, batch_size=4).next_batch()):
        with pytest.raises(CoderFileError) as exc:
            read()
        msg = str(exc.value)
        assert "\n" not in msg and str(shard) in msg, msg
        assert all(w in msg for w in words), msg


@pytest.mark.parametrize("index,words", [
    ({"layers": "3"}, ("'layers' must be a list",)),
    ({"layers": [3.5]}, ("'layers' must be integers",)),
    ({"d_in": "6"}, ("'d_in' must be an integer",)),
    ({"n_tokens": None}, ("'n_tokens' must be an integer",)),
    ({"shards": []}, ("'shards' must be a JSON object",)),
    ({"shards": {"3": "x"}}, ("the shards of layer 3 must be a list",)),
    ({"shards": {"3": [{"file": 5, "rows": 1, "sha256": "x"}]}}, ("'file' must be a string",)),
    ({"shards": {"3": [{"file": "/etc/passwd", "rows": 1, "sha256": "x"}]}}, ("not a file inside the cache",)),
    ({"shards": {"3": [{"file": "../x", "rows": 1, "sha256": "x"}]}}, ("not a file inside the cache",)),
])
def test_bad_index_is_one_line(tmp_path: Path, index: dict, words: tuple[str, ...]) -> None:
    folder = make_cache(tmp_path / "c", **index)
    with pytest.raises(CoderFileError) as exc:
        ActivationCache(folder)
    msg = str(exc.value)
    assert "\n" not in msg and str(folder / INDEX_NAME) in msg, msg
    assert all(w in msg for w in words), msg


def test_deeply_nested_index_is_one_line(tmp_path: Path) -> None:
    folder = make_cache(tmp_path / "c")
    (folder / INDEX_NAME).write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(CoderFileError, match="nested deeper than 64 levels"):
        ActivationCache(folder)


@pytest.mark.parametrize("change", [{"epoch": "abc"}, {"shard_pos": 5}, {"row_pos": -1}, {"batch_size": 0},
                                    {"layer": "3"}, {"seed": 1.5}])
def test_bad_stream_position_is_refused(tmp_path: Path, change: dict) -> None:
    stream = CachedActivationStream(make_cache(tmp_path / "c"), 3, batch_size=4)
    state = {**stream.state_dict(), **change}
    with pytest.raises(ConfigError):
        stream.load_state_dict(state)
    stream.load_state_dict(stream.state_dict())  # a good one still loads
