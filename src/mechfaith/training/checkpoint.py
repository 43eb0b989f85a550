"""Training checkpoints: one folder, replaced whole and atomically, with no pickle anywhere.

Layout of a checkpoint folder::

    coder/                   the coder, as written by coders.files.save_coder (load_coder reads it)
    optimizer.safetensors    Adam's state flattened: "<param>.step", "<param>.exp_avg", "<param>.exp_avg_sq"
    state.safetensors        the trainer's tensors: "dead.tokens_since_fired", "rng.<name>"
                             (torch.Generator.get_state() bytes), "stream.<key>" (the stream's tensors)
    trainer_state.json       format, format_version, step, tokens, train_config, metrics so far,
                             elapsed_s, the stream's JSON-safe state, SHA-256 of both safetensors files

The folder is written with :func:`mechfaith.atomic.atomic_dir`: a crash leaves the previous
checkpoint (possibly under ``.<name>.old`` for an instant, which :func:`load_checkpoint` also
finds) and never a half-written one. Every problem found when loading raises
:class:`CoderFileError` naming the file and the problem: the JSON's field types (both checksums
required), a step beyond the run's ``n_steps``, and every file's contents
(:mod:`mechfaith.coders.validate`; the optimizer's state must be finite like the weights).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechfaith.atomic import atomic_dir
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_files import is_clt_folder, load_clt, save_clt
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.files import load_coder, read_json, read_tensors, save_coder, write_tensors
from mechfaith.coders.validate import check_fields
from mechfaith.configs import config_from_dict, config_to_dict
from mechfaith.errors import CoderFileError, ConfigError, MechfaithError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.training.config import TrainConfig

log = logging.getLogger(__name__)

FORMAT = "mechfaith.checkpoint"
FORMAT_VERSION = 1
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
TENSORS_NAME = "state.safetensors"
CODER_DIR = "coder"
ADAM_FIELDS = ("step", "exp_avg", "exp_avg_sq")
# the JSON kinds of trainer_state.json's fields (coders.validate.check_fields)
STATE_FIELDS = {"step": "int", "tokens": "int", "train_config": "dict", "metrics": "list|null",
                "elapsed_s": "number|null", "stream": "dict|null", "stream_tensor_keys": "list|null",
                "optimizer_sha256": "str", "state_sha256": "str", "extra": "dict|null"}
REQUIRED_FIELDS = ("step", "tokens", "train_config", "optimizer_sha256", "state_sha256")


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, loaded and checked."""

    folder: Path
    coder: SparseCoder | CrossLayerTranscoder  # the checkpoint's coder folder says which
    train_config: TrainConfig
    step: int
    tokens: int
    optimizer_state: dict[str, Tensor]  # flattened Adam state (see flatten_adam_state)
    tensors: dict[str, Tensor]  # "dead.*", "rng.*" (stream tensors are moved into stream_state)
    stream_state: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- Adam
def flatten_adam_state(optimizer: torch.optim.Optimizer, names: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    """Adam's per-parameter state as ``{"<param name>.<field>": tensor}`` (CPU copies)."""
    by_id = {id(p): n for n, p in names.items()}
    flat: dict[str, Tensor] = {}
    for p, st in optimizer.state.items():
        name = by_id.get(id(p))
        if name is None:
            raise ValueError("the optimizer holds a parameter that is not among the named ones")
        for key in ADAM_FIELDS:
            if key not in st:
                raise ValueError(f"Adam state of {name} lacks {key!r}")
            value = st[key]
            t = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float32)
            flat[f"{name}.{key}"] = t.detach().cpu().clone()
    return flat


def restore_adam_state(optimizer: torch.optim.Optimizer, names: dict[str, torch.nn.Parameter],
                       flat: dict[str, Tensor], where: Path | str = "optimizer state") -> None:
    """Put a flattened Adam state back into ``optimizer`` (checking names and shapes)."""
    params_in_order = [p for g in optimizer.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(params_in_order)}
    state: dict[int, dict[str, Tensor]] = {}
    seen: set[str] = set()
    for name, p in names.items():
        keys = [f"{name}.{k}" for k in ADAM_FIELDS]
        present = [k in flat for k in keys]
        if not any(present):
            continue  # this parameter never had a gradient: no state
        if not all(present):
            raise CoderFileError(where, f"Adam state of {name} is incomplete")
        for k in keys:
            seen.add(k)
        for k in keys[1:]:
            if flat[k].shape != p.shape:
                raise CoderFileError(where, f"{k} has shape {tuple(flat[k].shape)}, the parameter "
                                            f"has {tuple(p.shape)}")
        if flat[keys[0]].numel() != 1:
            raise CoderFileError(where, f"{keys[0]} is not a scalar")
        state[index[id(p)]] = {k: flat[f"{name}.{k}"].clone() for k in ADAM_FIELDS}
    unknown = sorted(set(flat) - seen)
    if unknown:
        raise CoderFileError(where, f"Adam state for unknown parameters: {', '.join(unknown[:5])}")
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------- files
def resolve_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """The checkpoint folder, or its ``.<name>.old`` twin left by a crash during replacement."""
    folder = Path(folder)
    if (folder / STATE_NAME).is_file():
        return folder
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and (old / STATE_NAME).is_file():
        log.warning("checkpoint %s was being replaced when a run stopped; using %s", folder, old)
        return old
    if not folder.exists():
        raise CoderFileError(folder, "no checkpoint here (the folder does not exist)")
    raise CoderFileError(folder, f"not a checkpoint folder (no {STATE_NAME})")


def is_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a checkpoint (only looks for its state file)."""
    try:
        resolve_checkpoint(folder)
    except CoderFileError:
        return False
    return True


def save_checkpoint(folder: str | os.PathLike[str], *, coder: SparseCoder | CrossLayerTranscoder,
                    train_config: TrainConfig, step: int, tokens: int, optimizer_state: dict[str, Tensor],
                    tensors: dict[str, Tensor], stream_state: dict[str, Any] | None,
                    metrics: list[dict[str, Any]] | None = None, elapsed_s: float = 0.0,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (replacing any previous one). Returns the folder."""
    folder = Path(folder)
    all_tensors = dict(tensors)
    stream_json: dict[str, Any] | None = None
    stream_tensor_keys: list[str] = []
    if stream_state is not None:
        stream_json = {}
        for key, value in stream_state.items():
            if isinstance(value, Tensor):
                all_tensors[f"stream.{key}"] = value
                stream_tensor_keys.append(key)
            else:
                stream_json[key] = value
    with atomic_dir(folder) as tmp:
        if isinstance(coder, CrossLayerTranscoder):
            save_clt(coder, tmp / CODER_DIR, training={"step": step, "tokens": tokens})
        else:
            save_coder(coder, tmp / CODER_DIR, training={"step": step, "tokens": tokens})
        opt_sha = write_tensors(tmp / OPTIMIZER_NAME, optimizer_state, metadata={"format": FORMAT})
        tensors_sha = write_tensors(tmp / TENSORS_NAME, all_tensors, metadata={"format": FORMAT})
        write_json(tmp / STATE_NAME, json_safe({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "tokens": int(tokens),
            "train_config": config_to_dict(train_config),
            "metrics": metrics or [],
            "elapsed_s": float(elapsed_s),
            "stream": stream_json,
            "stream_tensor_keys": stream_tensor_keys,
            "optimizer_sha256": opt_sha,
            "state_sha256": tensors_sha,
            "extra": extra or {},
        }))
    return folder


def load_checkpoint(folder: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and check a checkpoint written by :func:`save_checkpoint`."""
    folder = resolve_checkpoint(folder)
    state_path = folder / STATE_NAME
    meta = read_json(state_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CoderFileError(state_path, f"not a mechfaith checkpoint (format is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CoderFileError(state_path, f"checkpoint format version {meta.get('format_version')!r} is "
                                         f"not supported (this mechfaith reads version {FORMAT_VERSION})")
    check_fields(state_path, meta, STATE_FIELDS, required=REQUIRED_FIELDS)
    for key in ("step", "tokens", "elapsed_s"):
        if (meta.get(key) or 0) < 0:
            raise CoderFileError(state_path, f"{key!r} must be >= 0, got {meta[key]!r}")
    if not all(isinstance(r, dict) for r in meta.get("metrics") or []):
        raise CoderFileError(state_path, "'metrics' must be a list of JSON objects")
    if not all(isinstance(k, str) for k in meta.get("stream_tensor_keys") or []):
        raise CoderFileError(state_path, "'stream_tensor_keys' must be a list of strings")
    try:
        train_config = config_from_dict(TrainConfig, meta["train_config"])
    except ConfigError as exc:
        raise CoderFileError(state_path, f"bad train_config: {exc}") from None
    if meta["step"] > train_config.n_steps:
        raise CoderFileError(state_path, f"'step' {meta['step']} is beyond the run's n_steps "
                                         f"{train_config.n_steps}: the checkpoint is damaged")
    if not (folder / CODER_DIR).is_dir():
        raise CoderFileError(folder, f"the checkpoint has no {CODER_DIR}/ folder")
    try:
        coder: SparseCoder | CrossLayerTranscoder
        if is_clt_folder(folder / CODER_DIR):
            coder = load_clt(folder / CODER_DIR, map_location=map_location)
        else:
            coder = load_coder(folder / CODER_DIR, map_location=map_location)
    except CoderFileError:
        raise
    except MechfaithError as exc:
        raise CoderFileError(folder / CODER_DIR, str(exc)) from None
    optimizer_state = read_tensors(folder / OPTIMIZER_NAME, expected_sha256=meta["optimizer_sha256"])
    tensors = read_tensors(folder / TENSORS_NAME, expected_sha256=meta["state_sha256"], weights=False)
    stream_state: dict[str, Any] | None = None
    stream_json = meta.get("stream")
    if stream_json is not None:
        stream_state = dict(stream_json)
        for key in meta.get("stream_tensor_keys") or []:
            name = f"stream.{key}"
            if name not in tensors:
                raise CoderFileError(folder / TENSORS_NAME, f"missing stream tensor {name!r}")
            stream_state[key] = tensors.pop(name)
    return Checkpoint(folder=folder, coder=coder, train_config=train_config, step=meta["step"],
                      tokens=meta["tokens"], optimizer_state=optimizer_state, tensors=tensors,
                      stream_state=stream_state, metrics=meta.get("metrics") or [],
                      elapsed_s=float(meta.get("elapsed_s") or 0.0), extra=meta.get("extra") or {})
