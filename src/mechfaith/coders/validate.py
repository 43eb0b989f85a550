"""One validation layer for what mechfaith reads from disk; every failure is one
:class:`~mechfaith.errors.CoderFileError` line naming the file and the problem.

- JSON: :func:`check_fields` (each named field of a JSON object of the expected kind: ``"str"``,
  ``"int"``, ``"number"``, ``"bool"``, ``"dict"``, ``"list"``, ``"null"``, alternatives joined
  by ``|``) and :func:`require_dict`; the nesting depth is capped where JSON is parsed
  (:func:`mechfaith.jsonio.loads_json`, :data:`MAX_NESTING` levels).
- Tensors: :func:`check_tensor` (rank, shape, floating point, finite, a lower bound) and
  :func:`check_weights` (every tensor of a weights file floating point and finite).

Weights policy, the same in every loader (mechfaith coders, SAELens folders, legacy GPT-2 ``.pt``):
float32, float16 and bfloat16 are accepted (float32 holds them exactly); float64 only when float32
holds every value exactly (otherwise casting would silently change the coder: it is refused, cast
the file to float32 first); integer, boolean and complex weights are refused; NaN and infinities
are refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from mechfaith.errors import CoderFileError
from mechfaith.jsonio import MAX_JSON_DEPTH

MAX_NESTING = MAX_JSON_DEPTH  # containers in any file (JSON, pickled configs) nest at most this deep
EXACT_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

Where = str | os.PathLike[str]


# ---------------------------------------------------------------------------------------------- JSON
def json_kind(value: Any) -> str:
    """The JSON kind of a parsed value: str, int, number (a non-integer float), bool, dict, list, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def _accepts(kinds: str, value: Any) -> bool:
    kind = json_kind(value)
    allowed = set(kinds.split("|"))
    return kind in allowed or (kind == "int" and "number" in allowed)


def _described(kinds: str) -> str:
    names = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
             "dict": "a JSON object", "list": "a list", "null": "null"}
    return " or ".join(names.get(k, k) for k in kinds.split("|"))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def require_dict(path: Where, data: Any, what: str = "a JSON object") -> dict[str, Any]:
    """``data`` if it is a JSON object, else a :class:`CoderFileError` naming ``path``."""
    if not isinstance(data, dict):
        raise CoderFileError(path, f"expected {what}, got {_described(json_kind(data))}")
    return data


def check_fields(path: Where, data: Mapping[str, Any], kinds: Mapping[str, str],
                 required: Collection[str] = ()) -> None:
    """Each field of ``kinds`` present in ``data`` has one of its kinds (``"int|null"``...); the
    ``required`` ones are present. Numbers must be finite; ints count as numbers."""
    for key, allowed in kinds.items():
        if key not in data:
            if key in required:
                raise CoderFileError(path, f"{key!r} is missing")
            continue
        value = data[key]
        if not _accepts(allowed, value):
            raise CoderFileError(path, f"{key!r} must be {_described(allowed)}, got {_short(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CoderFileError(path, f"{key!r} must be a finite number, got {value!r}")


# ---------------------------------------------------------------------------------------------- tensors
def check_tensor(path: Where, name: str, t: Any, *, rank: int | None = None,
                 shape: tuple[int, ...] | None = None, floating: bool = True, finite: bool = True,
                 min_value: float | None = None) -> Tensor:
    """Check one tensor read from ``path``; returns it unchanged (see the module docstring for the
    dtype policy when ``floating``)."""
    if not isinstance(t, Tensor):
        raise CoderFileError(path, f"{name} is not a tensor")
    if rank is not None and t.dim() != rank:
        raise CoderFileError(path, f"tensor {name} has {t.dim()} dimension(s) {tuple(t.shape)}, expected {rank}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CoderFileError(path, f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if floating:
        dtype = str(t.dtype).replace("torch.", "")
        if t.dtype not in EXACT_FLOATS and t.dtype != torch.float64:
            raise CoderFileError(path, f"tensor {name} has dtype {dtype}: weights must be floating point "
                                       f"(float32, float16, bfloat16)")
    if finite and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        bad = ~torch.isfinite(t)
        n_nan = int(torch.isnan(t).sum())
        raise CoderFileError(path, f"tensor {name} holds {int(bad.sum())} non-finite value(s) "
                                   f"({n_nan} NaN, {int(bad.sum()) - n_nan} infinite)")
    if floating and t.dtype == torch.float64 and not torch.equal(t.float().double(), t):
        raise CoderFileError(path, f"tensor {name} is float64 with values float32 cannot hold exactly "
                                   f"(mechfaith coders are float32: cast the weights to float32 first)")
    if min_value is not None and t.numel() and float(t.min()) < min_value:
        raise CoderFileError(path, f"tensor {name} holds values below {min_value:g} (minimum {float(t.min()):g})")
    return t


def check_weights(path: Where, tensors: Mapping[str, Tensor]) -> None:
    """Every tensor of a weights file is floating point (see the dtype policy) and finite."""
    for name, t in tensors.items():
        check_tensor(path, name, t)
