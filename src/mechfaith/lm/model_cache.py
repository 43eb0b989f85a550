"""Models loaded once per process: :func:`get_model` (cached by name, device and dtype, after a
fast :func:`check_model_name`) and :func:`resolve_layer` (-1: the middle layer).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from mechfaith.errors import InputError
from mechfaith.lm.adapters import FAMILIES, ModelAdapter
from mechfaith.lm.config import LMConfig
from mechfaith.lm.models import ALIASES, BUILTINS, LoadedModel, load_model

log = logging.getLogger(__name__)

_MODELS: dict[tuple[str, str, str], LoadedModel] = {}


def _hub_reachable() -> bool:
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


def check_model_name(name: str) -> None:
    """Fail fast (one line) for a name that is no built-in, no local folder, not in the Hugging Face
    cache, while the hub cannot be reached (instead of a minute of download retries)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in BUILTINS or (key.startswith("random-") and key[len("random-"):] in FAMILIES):
        return
    if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return
    try:
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # an invalid repo id, or no huggingface_hub: let the loader report it
        pass
    if not _hub_reachable():
        raise InputError(f"unknown model {name!r}: not a built-in ({', '.join(BUILTINS)}, "
                         f"random-gpt2/llama/bert), not a local folder, and the Hugging Face hub "
                         f"is unreachable")


def get_model(cfg: LMConfig) -> LoadedModel:
    """Load ``cfg.model`` (kept in memory for later calls in this process)."""
    key = (cfg.model, cfg.device, cfg.dtype)
    if key not in _MODELS:
        check_model_name(cfg.model)
        t0 = time.perf_counter()
        _MODELS[key] = load_model(cfg.model, cfg.device, cfg.dtype)
        log.info("loaded %s in %.1f s", cfg.model, time.perf_counter() - t0)
    return _MODELS[key]


def resolve_layer(adapter: ModelAdapter, layer: int) -> int:
    """``layer``, or the middle layer for -1; a one-line error when out of range."""
    if layer == -1:
        return adapter.n_layers // 2
    return adapter.check_layer(int(layer))
