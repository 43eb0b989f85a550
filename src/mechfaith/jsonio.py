"""JSON for every package: :func:`json_safe` (Python values that strict JSON can hold) and
:func:`write_json` (sorted, indented, written atomically).

Top-level like :mod:`mechfaith.atomic`, so every package may use it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import PurePath
from typing import Any

from torch import Tensor

from mechfaith.atomic import atomic_path


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON can hold it: floats that are not finite become None; tensors and
    numpy arrays lists (0-d ones and numpy scalars Python numbers); dataclasses dicts; tuples lists;
    paths strings; dict keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        return json_safe(asdict(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # numpy scalars and arrays
        return json_safe(obj.tolist())
    return obj


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
