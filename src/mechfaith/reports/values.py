"""One formatter for numbers shown to people (report tables, captions, CLI summaries).

:func:`fmt_value` writes a value, optionally with its error (a standard error or a standard
deviation) as ``"value ± err"``; a missing value (``None``, NaN, ±inf) becomes a dash-like
placeholder (``"n/a"`` unless told otherwise) and a missing error is left out.
"""

from __future__ import annotations

import json
import math
from typing import Any

MISSING = "n/a"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return _is_number(x) and math.isfinite(x)


def fmt_value(value: Any, err: Any = None, *, spec: str = ".4g", err_spec: str = ".2g",
              missing: str = MISSING) -> str:
    """``value`` as text, with ``" ± err"`` when ``err`` is a finite number.

    - ``None`` and non-finite floats: ``missing``;
    - floats: ``format(value, spec)``; ints and bools: ``str(value)`` (exact, never rounded);
    - dicts and lists: compact JSON; anything else: ``str(value)``.
    The error is formatted with ``err_spec``; a ``None``, NaN or non-numeric error is dropped.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    if isinstance(value, float):
        text = format(value, spec)
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    if _finite(err):
        text += f" ± {format(err, err_spec)}"
    return text


def as_float(value: Any) -> float:
    """``value`` as a float for plotting; NaN when it is missing, non-numeric or non-finite."""
    return float(value) if _finite(value) else float("nan")


__all__ = ["MISSING", "as_float", "fmt_value"]
