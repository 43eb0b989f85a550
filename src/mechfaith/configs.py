"""Documented dataclass configs: each field carries its help text, which becomes the CLI help.

Use :func:`doc` to declare a field, :func:`config_to_dict` / :func:`config_from_dict` to move a
config to and from JSON-safe data with type and choice checks (no pickle anywhere);
:func:`coerce_value` checks one field's value and :func:`base_type` strips ``Optional`` from a
field's type (both shared with the CLI); :func:`check_finite` refuses NaN and infinities (every
config's ``__post_init__`` calls it).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Sequence, TypeVar

from mechfaith.errors import ConfigError

T = TypeVar("T")


def doc(help: str, default: Any = dataclasses.MISSING, *, choices: Sequence[Any] | None = None,
        default_factory: Any = dataclasses.MISSING, kind: str | None = None) -> Any:
    """A dataclass field with its documentation (and, optionally, the allowed values). ``kind``:
    what the value names beyond its type, for the checks of the command line (``"device"``: a
    torch device, checked to exist on this machine when a command starts)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if kind is not None:
        meta["kind"] = kind
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_help(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)


def check_finite(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the field when a float of dataclass ``cfg`` (or a float in
    one of its list fields) is NaN or infinite: rates, scales, thresholds and coefficients must be
    numbers (an infinite learning rate only "diverges" later)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{type(cfg).__name__}.{f.name} must be a finite number, got {value!r}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (nested dataclasses become dicts)."""
    return dataclasses.asdict(cfg)


def base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``Optional``; return (inner type, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], allows_none
        return tp, allows_none
    return tp, False


def coerce_value(cls: type, f: dataclasses.Field, value: Any) -> Any:
    """Check and convert one value for field ``f`` of ``cls`` (strings from the CLI included)."""
    hints = typing.get_type_hints(cls)
    tp, allows_none = base_type(hints[f.name])
    where = f"{cls.__name__}.{f.name}"
    if value is None or (isinstance(value, str) and value.lower() == "none" and allows_none):
        if allows_none:
            return None
        raise ConfigError(f"{where} must not be None")
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    value = True
                elif low in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ValueError(value)
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
        elif tp is str:
            if not isinstance(value, str):
                raise ValueError(value)
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = config_from_dict(tp, value)
        elif typing.get_origin(tp) in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            (inner,) = typing.get_args(tp)[:1] or (Any,)
            conv = {int: int, float: float, str: str}.get(inner, lambda v: v)
            value = [conv(v) for v in value]
            if typing.get_origin(tp) is tuple:
                value = tuple(value)
        elif typing.get_origin(tp) is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def config_from_dict(cls: type[T], data: dict[str, Any], *, strict: bool = True) -> T:
    """Build ``cls`` from a dict, checking types and choices; unknown keys raise if ``strict``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown and strict:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
    kwargs = {k: coerce_value(cls, fields[k], v) for k, v in data.items() if k in fields}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None
