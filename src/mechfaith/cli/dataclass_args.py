"""Documented dataclass configs as command-line options, plus TOML/YAML config files.

Each field becomes ``--<prefix><field-name-with-dashes>``; its help is the field's ``doc()`` text,
its choices come from ``doc(choices=...)``, and booleans get ``--flag/--no-flag``. Options default to
None ("not given"), so :func:`dataclass_from_args` can layer the values:
built-in defaults < config file < flags given on the command line. The values are checked there:
types and choices by :func:`~mechfaith.configs.coerce_value`, ranges and finiteness by the config's
``__post_init__``, a device field (``doc(kind="device")``) by :func:`~mechfaith.cli.arg_types.check_device`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

from mechfaith.cli.arg_types import check_device
from mechfaith.configs import base_type, coerce_value
from mechfaith.errors import ConfigError
from mechfaith.jsonio import loads_json

T = TypeVar("T")


def _dest(prefix: str, name: str) -> str:
    return (prefix + name).replace("-", "_")


def _default_text(f: dataclasses.Field, overrides: typing.Mapping[str, Any]) -> str:
    if f.name in overrides:
        return f" (default: {overrides[f.name]})"
    if f.default is not dataclasses.MISSING:
        return f" (default: {f.default})"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f" (default: {f.default_factory()})"  # type: ignore[misc]
    return " (required)"


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (dataclass options state their own default in their help, and
    default to None so that an option left out can be told from one given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def add_dataclass_args(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
                       exclude: typing.AbstractSet[str] = frozenset(),
                       defaults: typing.Mapping[str, Any] | None = None) -> None:
    """Add one option per field of dataclass ``cls`` to ``parser`` (a parser or argument group).

    ``defaults`` only changes the default shown in the help (for a command whose built-in values
    differ from the dataclass's; pass the same values as ``file_values`` to :func:`dataclass_from_args`).
    """
    overrides = dict(defaults or {})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        tp, _ = base_type(hints[f.name])
        if tp is dict or typing.get_origin(tp) is dict or dataclasses.is_dataclass(tp):
            continue  # mappings and nested configs come from the config file only
        help_text = (str(f.metadata.get("help", "")) + _default_text(f, overrides)).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": _dest(prefix, f.name), "default": None, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = f.metadata.get("choices")
            if choices is not None:
                kwargs["choices"] = list(choices)
            kwargs["metavar"] = {int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "VALUE")
            if choices is not None:
                kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        parser.add_argument(flag, **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, *, prefix: str = "",
                        file_values: dict[str, Any] | None = None) -> T:
    """Build ``cls``: built-in defaults < ``file_values`` < options given on the command line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    check_file_keys(cls, file_values or {})
    values = {key.replace("-", "_"): value for key, value in (file_values or {}).items()}
    for name in fields:
        given = getattr(args, _dest(prefix, name), None)
        if given is not None:
            values[name] = given
    missing = [n for n, f in fields.items() if n not in values and f.init
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        flags = ", ".join("--" + prefix + n.replace("_", "-") for n in missing)
        raise ConfigError(f"{cls.__name__}: missing required option(s) {flags} "
                          f"(give them as flags or in the config file)")
    checked = {k: coerce_value(cls, fields[k], v) for k, v in values.items()}
    try:
        cfg = cls(**checked)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None
    for name, f in fields.items():
        if f.metadata.get("kind") == "device":
            check_device(getattr(cfg, name), "--" + prefix + name.replace("_", "-"))
    return cfg


def check_file_keys(cls: type, file_values: typing.Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a key of a config-file section that is not a field of ``cls``
    (also for a section a command reads only to check it, e.g. ``[train]`` in ``lm collect``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in file_values:
        if str(key).replace("-", "_") not in names:
            raise ConfigError(f"{cls.__name__}: unknown option {key!r} in the config file")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = loads_json(text)  # depth-capped, as every JSON mechfaith reads
        else:
            raise ConfigError(f"{path}: unknown config file type {suffix!r} (use .toml, .yaml or .json)")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors of three libraries: report the first line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not a valid {suffix[1:].upper()} file ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values at the top level")
    return data


def load_config_sections(path: str | Path | None, sections: typing.Sequence[str]) -> dict[str, dict[str, Any]]:
    """Read a config file made of named sections (``[coder]``, ``[train]``, ...); every one of
    ``sections`` is in the result (empty when absent or when ``path`` is None); unknown sections
    and sections that are not mappings raise :class:`ConfigError`."""
    if not path:
        return {s: {} for s in sections}
    data = load_config_file(path)
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; expected {', '.join(sections)}")
    out: dict[str, dict[str, Any]] = {}
    for name in sections:
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section [{name}] must be a mapping")
        out[name] = section
    return out


def config_with_quick(cls: type[T], args: argparse.Namespace, section: str, quick: typing.Mapping[str, Any]) -> T:
    """``cls`` from built-in defaults < the ``quick`` preset (with ``--quick``) < the config file (its
    ``[section]``, or the whole file when it has none) < flags on the command line."""
    file_values: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = load_config_file(args.config)
        values = data.get(section, data)
        if not isinstance(values, dict):
            raise ConfigError(f"{args.config}: the [{section}] section must be a mapping of {cls.__name__} values")
        file_values = values
    if getattr(args, "quick", False):
        file_values = {**quick, **file_values}
    return dataclass_from_args(cls, args, file_values=file_values)


def add_quiet_option(parser: argparse.ArgumentParser, help: str = "hide progress bars") -> None:
    """``--quiet`` on a command (unless its parser already has it); absent from the namespace when not
    given, so the top-level ``-q`` can set it."""
    if not any("--quiet" in a.option_strings for a in parser._actions):
        parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=help)
