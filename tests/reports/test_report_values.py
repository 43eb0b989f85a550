"""The one value formatter (mechfaith.reports.values): exact outputs for every case it covers."""

from __future__ import annotations

import math

import pytest

from mechfaith.reports.values import MISSING, as_float, fmt_value


@pytest.mark.parametrize("value, err, kwargs, expected", [
    (0.123456, None, {}, "0.1235"),
    (0.123456, 0.0123, {}, "0.1235 ± 0.012"),
    (0.123456, 0.0123, {"spec": ".3g"}, "0.123 ± 0.012"),
    (12.34567, 0.5, {"spec": ".4f", "err_spec": ".1f"}, "12.3457 ± 0.5"),
    (3.0, None, {"spec": "7.1f"}, "    3.0"),
    (123456, None, {}, "123456"),          # ints are exact, never rounded
    (5, 1, {}, "5 ± 1"),
    (True, None, {}, "True"),
    ("topk", None, {}, "topk"),
    ({"a": 1}, None, {}, '{"a": 1}'),
    ([1, 2.5], None, {}, "[1, 2.5]"),
    (None, None, {}, "n/a"),
    (None, 0.1, {}, "n/a"),
    (float("nan"), None, {}, "n/a"),
    (float("inf"), 0.1, {}, "n/a"),
    (None, None, {"missing": "None"}, "None"),
    (float("nan"), None, {"missing": "—"}, "—"),
    (0.5, float("nan"), {}, "0.5"),        # a missing error is left out
    (0.5, None, {}, "0.5"),
    (0.5, "x", {}, "0.5"),
    (0.5, True, {}, "0.5"),
])
def test_fmt_value(value, err, kwargs, expected):
    assert fmt_value(value, err, **kwargs) == expected


def test_missing_constant_and_as_float():
    assert MISSING == "n/a"
    assert as_float(2) == 2.0 and as_float(0.5) == 0.5
    for bad in (None, "1", float("inf"), float("nan"), True):
        assert math.isnan(as_float(bad))
