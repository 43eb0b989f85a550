"""The on-disk activation cache: safetensors shards of (input, target) pairs and their batch stream.

- :func:`write_activation_cache` collects the pairs (:mod:`mechfaith.lm.activations`) and stores
  them shuffled on disk, one folder per layer of safetensors shards (``x``, ``y``) plus
  ``index.json`` (sizes, sites, SHA-256 of each shard), so several coders and sweeps train from
  one collection.
- :class:`ActivationCache` reads such a folder (shards, whole layers, checksums).
- :class:`CachedActivationStream`: a batch stream for the trainer (``next_batch() -> (x, y)``,
  ``state_dict()``, ``load_state_dict()``) from disk; exactly resumable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mechfaith.atomic import atomic_dir
from mechfaith.coders.files import read_json, sha256_file, write_tensors
from mechfaith.coders.validate import check_fields, check_tensor
from mechfaith.configs import config_to_dict
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.jsonio import write_json
from mechfaith.lm.activations import (
    STORAGE_DTYPES,
    ActivationConfig,
    ShuffleBuffer,
    check_contexts,
    iter_model_activations,
    seeded_perm,
)
from mechfaith.lm.adapters import get_adapter

log = logging.getLogger(__name__)

FORMAT = "mechfaith.activations"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"


def write_activation_cache(model: Any, contexts: Tensor, cfg: ActivationConfig, folder: str | os.PathLike[str],
                           model_name: str = "", progress: bool = True,
                           extra: dict[str, Any] | None = None) -> Path:
    """Collect ``cfg.layers`` in one pass over ``contexts`` and write shuffled shards to ``folder``
    (replaced whole, atomically). Returns the folder."""
    adapter = get_adapter(model)
    contexts = check_contexts(contexts)
    if cfg.max_contexts:
        contexts = contexts[: cfg.max_contexts]
    dtype = STORAGE_DTYPES[cfg.storage_dtype]
    folder = Path(folder)
    layers = [adapter.check_layer(int(l)) for l in cfg.layers]
    shards: dict[str, list[dict[str, Any]]] = {str(l): [] for l in layers}
    with atomic_dir(folder) as tmp:
        buffers = {l: ShuffleBuffer(cfg.buffer_tokens, torch.Generator().manual_seed(cfg.seed * 1000 + l))
                   for l in layers}
        pending: dict[int, list[tuple[Tensor, Tensor]]] = {l: [] for l in layers}
        pending_rows = {l: 0 for l in layers}
        dims: dict[int, tuple[int, int]] = {}

        def write_shard(layer: int, x: Tensor, y: Tensor) -> None:
            sub = tmp / f"layer_{layer:02d}"
            sub.mkdir(exist_ok=True)
            name = f"shard_{len(shards[str(layer)]):05d}.safetensors"
            digest = write_tensors(sub / name, {"x": x.to(dtype), "y": y.to(dtype)})
            shards[str(layer)].append({"file": f"{sub.name}/{name}", "rows": int(x.shape[0]), "sha256": digest})

        def take(layer: int, chunks: list[tuple[Tensor, ...]], final: bool = False) -> None:
            for x, y in chunks:
                pending[layer].append((x, y))
                pending_rows[layer] += x.shape[0]
            while pending_rows[layer] >= cfg.shard_tokens or (final and pending_rows[layer] > 0):
                xs = torch.cat([p[0] for p in pending[layer]])
                ys = torch.cat([p[1] for p in pending[layer]])
                n = min(cfg.shard_tokens, xs.shape[0])
                write_shard(layer, xs[:n], ys[:n])
                pending[layer] = [(xs[n:], ys[n:])] if xs.shape[0] > n else []
                pending_rows[layer] = xs.shape[0] - n

        for batch in iter_model_activations(adapter, contexts, layers, cfg.input_site, cfg.output_site,
                                            cfg.batch_contexts, cfg.exclude_bos, progress):
            for layer, (x, y) in batch.items():
                dims[layer] = (x.shape[1], y.shape[1])
                take(layer, buffers[layer].add(x.cpu(), y.cpu()))
        for layer in layers:
            take(layer, buffers[layer].flush(), final=True)
        index = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": model_name,
            "family": adapter.family.name, "layers": layers, "input_site": cfg.input_site,
            "output_site": cfg.output_site, "d_in": dims[layers[0]][0], "d_out": dims[layers[0]][1],
            "dtype": cfg.storage_dtype, "exclude_bos": cfg.exclude_bos,
            "n_contexts": int(contexts.shape[0]), "context_length": int(contexts.shape[1]),
            "n_tokens": sum(s["rows"] for s in shards[str(layers[0])]),
            "config": config_to_dict(cfg), "shards": shards, "extra": extra or {},
        }
        write_json(tmp / INDEX_NAME, index)
    log.info("wrote %d rows x %d layers to %s", index["n_tokens"], len(layers), folder)
    return folder


def check_index(path: Path, index: dict[str, Any]) -> None:
    """The fields of an activation cache's ``index.json`` (types, sizes, shard entries inside the folder)."""
    check_fields(path, index, {"layers": "list", "n_tokens": "int", "d_in": "int", "d_out": "int",
                               "shards": "dict", "input_site": "str", "output_site": "str", "model": "str",
                               "extra": "dict"},
                 required=("layers", "n_tokens", "d_in", "d_out", "shards"))
    check_fields(path, index.get("extra", {}), {"lm": "dict|null", "corpus": "dict|null"})
    if not all(type(l) is int for l in index["layers"]) or min(index["d_in"], index["d_out"], index["n_tokens"]) < 0:
        raise CoderFileError(path, "'layers' must be integers and the sizes >= 0")
    for layer, shards in index["shards"].items():
        if not isinstance(shards, list) or not all(isinstance(i, dict) for i in shards):
            raise CoderFileError(path, f"the shards of layer {layer} must be a list of JSON objects")
        for info in shards:
            check_fields(path, info, {"file": "str", "rows": "int", "sha256": "str"},
                         required=("file", "rows", "sha256"))
            file = Path(info["file"])
            if file.is_absolute() or ".." in file.parts or info["rows"] < 0:
                raise CoderFileError(path, f"shard entry {info['file']!r:.80} ({info['rows']} rows) "
                                           f"is not a file inside the cache")
    for layer in index["layers"]:  # every layer's shards hold the cache's tokens (and at least one row)
        shards = index["shards"].get(str(layer))
        rows = sum(info["rows"] for info in shards) if isinstance(shards, list) else None
        if not shards or rows != index["n_tokens"] or not rows:
            raise CoderFileError(path, f"layer {layer} has {rows or 'no'} rows in its shards, the index says "
                                       f"{index['n_tokens']} tokens")


class ActivationCache:
    """A folder written by :func:`write_activation_cache`."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_NAME
        if not index_path.is_file():
            raise CoderFileError(self.folder, f"no {INDEX_NAME}: not an activation cache")
        index = read_json(index_path)
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise CoderFileError(index_path, f"not an activation cache (format is not {FORMAT!r})")
        if index.get("format_version") != FORMAT_VERSION:
            raise CoderFileError(index_path, f"activation cache version {index.get('format_version')!r} "
                                             f"is not supported (this mechfaith reads {FORMAT_VERSION})")
        check_index(index_path, index)
        self.index = index
        self.layers: list[int] = list(index["layers"])
        self.n_tokens: int = index["n_tokens"]
        self.d_in: int = index["d_in"]
        self.d_out: int = index["d_out"]

    def shards(self, layer: int) -> list[dict[str, Any]]:
        try:
            return self.index["shards"][str(int(layer))]
        except KeyError:
            raise ConfigError(f"layer {layer} is not in the activation cache (it has {self.layers})") from None

    def read_shard(self, layer: int, i: int, verify: bool = False) -> tuple[Tensor, Tensor]:
        """Shard ``i`` of ``layer`` as float32 tensors (x, y)."""
        info = self.shards(layer)[i]
        path = self.folder / info["file"]
        if not path.is_file():
            raise CoderFileError(path, "shard file missing")
        if verify and sha256_file(path) != info["sha256"]:
            raise CoderFileError(path, "checksum mismatch: the shard is truncated or corrupt")
        try:
            with safe_open(str(path), framework="pt") as fh:
                x, y = fh.get_tensor("x"), fh.get_tensor("y")
        except Exception as exc:  # safetensors raises several types
            raise CoderFileError(path, f"not a readable shard ({type(exc).__name__}: {exc})") from None
        check_tensor(path, "x", x, rank=2)  # floating point and finite, like weights
        check_tensor(path, "y", y, rank=2)
        if x.shape[1] != self.d_in or y.shape[1] != self.d_out:
            raise CoderFileError(path, f"holds rows of width {x.shape[1]} -> {y.shape[1]}, the index says "
                                       f"{self.d_in} -> {self.d_out}")
        if x.shape[0] != info["rows"] or y.shape[0] != info["rows"]:
            raise CoderFileError(path, f"has {x.shape[0]} rows, index says {info['rows']}")
        return x.float(), y.float()

    def load(self, layer: int, max_rows: int | None = None) -> tuple[Tensor, Tensor]:
        """All (or the first ``max_rows``) rows of ``layer`` in memory."""
        xs, ys, n = [], [], 0
        for i in range(len(self.shards(layer))):
            x, y = self.read_shard(layer, i)
            xs.append(x)
            ys.append(y)
            n += x.shape[0]
            if max_rows is not None and n >= max_rows:
                break
        x, y = torch.cat(xs), torch.cat(ys)
        return (x[:max_rows], y[:max_rows]) if max_rows is not None else (x, y)

    def verify(self) -> None:
        """Check every shard's SHA-256; raise :class:`CoderFileError` on the first damaged one."""
        for layer in self.layers:
            for info in self.shards(layer):
                path = self.folder / info["file"]
                if not path.is_file() or sha256_file(path) != info["sha256"]:
                    raise CoderFileError(path, "missing, truncated or corrupt shard")

    def stream(self, layer: int, batch_size: int = 1024, seed: int = 0,
               device: str | torch.device = "cpu") -> "CachedActivationStream":
        return CachedActivationStream(self, layer, batch_size, seed, device)


class CachedActivationStream:
    """Endless ``(x, y)`` batches of one layer from an activation cache.

    Epoch ``e`` visits the shards in a seeded random order and each shard's rows in a seeded random
    order; batches run across shard and epoch boundaries. The position (epoch, shard, row) is the
    whole state, so :meth:`load_state_dict` resumes exactly.
    """

    def __init__(self, cache: ActivationCache | str | os.PathLike[str], layer: int, batch_size: int = 1024,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
        self.layer = int(layer)
        self.n_shards = len(self.cache.shards(self.layer))
        if self.n_shards == 0:
            raise ConfigError(f"layer {layer} has no shards")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.epoch, self.shard_pos, self.row_pos = 0, 0, 0
        self._loaded: tuple[int, int, Tensor, Tensor] | None = None  # (epoch, shard_pos, x, y)

    @property
    def d_in(self) -> int:
        return self.cache.d_in

    @property
    def d_out(self) -> int:
        return self.cache.d_out

    def _current(self) -> tuple[Tensor, Tensor]:
        key = (self.epoch, self.shard_pos)
        if self._loaded is None or self._loaded[:2] != key:
            shard = int(seeded_perm(self.n_shards, self.seed, self.epoch)[self.shard_pos])
            x, y = self.cache.read_shard(self.layer, shard)
            rows = seeded_perm(x.shape[0], self.seed, self.epoch, shard, 1)
            self._loaded = (self.epoch, self.shard_pos, x[rows], y[rows])
        return self._loaded[2], self._loaded[3]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next ``(x [batch_size, d_in], y [batch_size, d_out])`` on the stream's device."""
        xs, ys, need = [], [], self.batch_size
        while need > 0:
            x, y = self._current()
            take = min(need, x.shape[0] - self.row_pos)
            xs.append(x[self.row_pos:self.row_pos + take])
            ys.append(y[self.row_pos:self.row_pos + take])
            need -= take
            self.row_pos += take
            if self.row_pos >= x.shape[0]:
                self.row_pos = 0
                self.shard_pos += 1
                if self.shard_pos >= self.n_shards:
                    self.shard_pos = 0
                    self.epoch += 1
        return torch.cat(xs).to(self.device), torch.cat(ys).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cached", "layer": self.layer, "seed": self.seed, "epoch": self.epoch,
                "shard_pos": self.shard_pos, "row_pos": self.row_pos, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != "cached" or state.get("layer") != self.layer:
            raise ConfigError(f"stream state is for another stream ({str(state)[:80]})")
        for key in ("seed", "epoch", "shard_pos", "row_pos", "batch_size"):
            value = state.get(key, self.batch_size if key == "batch_size" else None)
            if type(value) is not int or (value < 0 and key != "seed") or (key == "batch_size" and value == 0) \
                    or (key == "shard_pos" and value >= self.n_shards):
                raise ConfigError(f"stream state: {key} {str(value)[:40]!r} is not a valid position of this cache")
        self.seed = state["seed"]
        self.epoch, self.shard_pos, self.row_pos = state["epoch"], state["shard_pos"], state["row_pos"]
        self.batch_size = state.get("batch_size", self.batch_size)
        self._loaded = None
