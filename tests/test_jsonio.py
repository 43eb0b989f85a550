"""The one JSON writer: json_safe's conversions and write_json's atomic, strict output."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mechfaith.jsonio import json_safe, write_json


@dataclass
class Point:
    x: float
    where: Path


def test_json_safe_turns_everything_into_strict_json_values():
    value = {1: [float("nan"), float("inf"), 2.5, (1, 2)], "t": torch.tensor([1.0, float("nan")]),
             "t0": torch.tensor(3), "np": np.float32(0.5), "npi": np.int64(7), "arr": np.array([1, 2]),
             "p": Path("a/b"), "dc": Point(float("-inf"), Path("c"))}
    out = json_safe(value)
    assert out == {"1": [None, None, 2.5, [1, 2]], "t": [1.0, None], "t0": 3, "np": 0.5, "npi": 7,
                   "arr": [1, 2], "p": "a/b", "dc": {"x": None, "where": "c"}}
    assert type(out["np"]) is float and type(out["npi"]) is int
    json.dumps(out, allow_nan=False)  # strict JSON


def test_write_json_is_sorted_indented_and_atomic(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json(path, {"b": 1, "a": [math.pi]})
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n") and "\n  " in text
    assert json.loads(text) == {"a": [math.pi], "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_loads_json_caps_the_nesting_depth():
    import pytest

    from mechfaith.errors import InputError
    from mechfaith.jsonio import MAX_JSON_DEPTH, json_too_deep, loads_json

    assert loads_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    assert loads_json('{"a": "[[[[' + "[" * 100 + '\\"]]"}') == {"a": "[[[[" + "[" * 100 + '"]]'}
    for deep in ("[" * 100_000 + "]" * 100_000, '{"a":' * 65 + "1" + "}" * 65, "[{" * 33 + "}]" * 33):
        assert json_too_deep(deep)
        with pytest.raises(InputError, match="nested deeper than 64 levels"):
            loads_json(deep)
    assert not json_too_deep("[" + "[]," * 1000 + "[]]")  # wide, not deep
    with pytest.raises(InputError, match="not valid JSON"):
        loads_json("{")
    with pytest.raises(InputError, match="not valid JSON"):
        loads_json("1" * 5000)  # an integer too long to convert
