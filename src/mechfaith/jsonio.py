"""JSON for every package: :func:`json_safe` (Python values that strict JSON can hold),
:func:`write_json` (sorted, indented, written atomically) and :func:`loads_json` (parsing with the
nesting capped at :data:`MAX_JSON_DEPTH` levels, so a hostile file cannot exhaust the stack).

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
from mechfaith.errors import InputError

MAX_JSON_DEPTH = 64  # nesting levels; mechfaith's own files use fewer than 10
_BRACKETS = bytes.maketrans(b"{}", b"[]")  # depth does not depend on the kind of bracket
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


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


def json_too_deep(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` nests arrays/objects deeper than ``max_depth`` levels, found without parsing
    (and in C: escapes and strings are dropped, then each pass removes the innermost pairs)."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    raw = text.encode("utf-8", "surrogatepass").replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(raw.split(b'"')[::2]).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(max_depth):
        shorter = brackets.replace(b"[]", b"")
        if not shorter or len(shorter) == len(brackets):
            return False  # done, or unbalanced (the parser reports that)
        brackets = shorter
    return True


def loads_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON; malformed or too deeply nested text raises :class:`~mechfaith.errors.InputError`
    (one line; the caller adds the file's name)."""
    if json_too_deep(text, max_depth):
        raise InputError(f"not valid JSON (nested deeper than {max_depth} levels)")
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"not valid JSON (nested deeper than {max_depth} levels)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise InputError(f"not valid JSON ({type(exc).__name__}: {exc})") from None
