"""Checked command-line values: argparse ``type=`` helpers and the ``--device`` check.

Each helper turns the option's text into its value or raises :class:`argparse.ArgumentTypeError`
with the problem, so that a bad value is refused while the arguments are parsed (before any work
or any write) with one line ``mechfaith: error: <command>: argument --flag: <problem>``. Options that
come from dataclass configs are checked by the configs' ``__post_init__`` instead (see
:mod:`mechfaith.cli.dataclass_args`), and a config's device field by :func:`check_device`.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from mechfaith.errors import ConfigError

DEVICES_TEXT = "cpu, cuda, cuda:N or mps"


def _integer(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """A ``type=`` for integers >= ``low``."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def finite_float(text: str) -> float:
    """A ``type=`` for finite numbers (no NaN, no infinity)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    """A ``type=`` for finite numbers >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def device_problem(text: str) -> str | None:
    """Why ``text`` is not a torch device usable here (None when it is): not a device name, or a
    device this machine lacks (CUDA without CUDA, cuda:3 with two GPUs, MPS off a Mac)."""
    if text == "cpu":  # the default: no need to import torch
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"{text!r} is not a torch device ({DEVICES_TEXT})"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{text!r}: CUDA is not available on this machine"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"{text!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
        return None
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        return None if mps is not None and mps.is_available() else f"{text!r}: MPS is not available on this machine"
    return f"{text!r}: device type {device.type!r} is not supported ({DEVICES_TEXT})"


def device(text: str) -> str:
    """A ``type=`` for ``--device``: a torch device this machine has (see :func:`device_problem`)."""
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def check_device(value: str, flag: str = "--device") -> str:
    """Raise :class:`ConfigError` naming ``flag`` unless ``value`` is a usable torch device."""
    problem = device_problem(str(value))
    if problem is not None:
        raise ConfigError(f"{flag}: {problem}")
    return value


def layers_spec(text: str) -> str:
    """A ``type=`` for ``--layers`` (``all``, ``0-29``, ``1,3,5``): its syntax, before the model is
    loaded (whether the model has those layers is checked once it is)."""
    from mechfaith.lm.layer_set import layer_ranges

    try:
        layer_ranges(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--layers ")) from None
    return text
