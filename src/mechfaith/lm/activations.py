"""Activation store: (input, target) pairs of one or several layers, collected in one forward pass.

- :func:`iter_model_activations` runs the model over token contexts and yields, per forward batch,
  ``{layer: (x [n, d_in], y [n, d_out])}`` at the configured sites. The forward pass stops right
  after the last activation needed (a hook raises :class:`~mechfaith.lm.adapters.StopForward`), so
  collecting layer 15 of 30 costs about half a forward pass.
- :class:`ShuffleBuffer` mixes rows from many contexts: memory is bounded by its capacity, not by
  the corpus.
- :func:`write_activation_cache` stores the shuffled pairs on disk, one folder per layer of
  safetensors shards (``x``, ``y``) plus ``index.json`` (sizes, sites, SHA-256 of each shard), so
  several coders and sweeps train from one collection.
- Batch streams (``next_batch() -> (x, y)``, ``state_dict()``, ``load_state_dict()``) feed the
  trainer: :class:`CachedActivationStream` (from disk; exactly resumable) and
  :class:`ModelActivationStream` (straight from the model; resumes at the next unread context with
  an empty buffer).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from mechfaith.atomic import atomic_dir
from mechfaith.coders.files import read_json, sha256_file, write_tensors
from mechfaith.configs import config_to_dict, doc
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.jsonio import write_json
from mechfaith.lm.adapters import INPUT_SITES, OUTPUT_SITES, ModelAdapter, get_adapter

log = logging.getLogger(__name__)

FORMAT = "mechfaith.activations"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ActivationConfig:
    """What to collect and how to batch, shuffle and store it."""

    layers: list[int] = doc("Layers whose (input, output) pairs are collected in one pass.",
                            default_factory=lambda: [0])
    input_site: str = doc("Coder input: mlp_in (after the pre-MLP norm), mlp_in_normalized "
                          "(norm without its affine; TransformerLens convention) or resid_pre.",
                          "mlp_in", choices=INPUT_SITES)
    output_site: str = doc("Coder target: mlp_out, mlp_out_centered (minus its mean over d_model) "
                           "or resid_post.", "mlp_out", choices=OUTPUT_SITES)
    batch_contexts: int = doc("Contexts per forward pass of the model.", 8)
    buffer_tokens: int = doc("Rows in the shuffle buffer (per layer); memory is bounded by this.", 65536)
    batch_size: int = doc("Rows per training batch.", 1024)
    exclude_bos: bool = doc("Leave out the BOS position of each context (its activations are "
                            "atypical: tiny input norm, thousands of active ReLU latents).", True)
    seed: int = doc("Seed of the shuffling.", 0)
    storage_dtype: str = doc("dtype of the cached activations on disk.", "float32",
                             choices=tuple(STORAGE_DTYPES))
    shard_tokens: int = doc("Rows per shard file.", 65536)
    max_contexts: int = doc("Collect from at most this many contexts (0: all).", 0)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("ActivationConfig.layers must name at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"ActivationConfig.layers has duplicates: {self.layers}")
        for name in ("batch_contexts", "buffer_tokens", "batch_size", "shard_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ActivationConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_contexts < 0:
            raise ConfigError("ActivationConfig.max_contexts must be >= 0")
        if self.input_site not in INPUT_SITES:
            raise ConfigError(f"ActivationConfig.input_site {self.input_site!r} is not one of {', '.join(INPUT_SITES)}")
        if self.output_site not in OUTPUT_SITES:
            raise ConfigError(f"ActivationConfig.output_site {self.output_site!r} is not one of {', '.join(OUTPUT_SITES)}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"ActivationConfig.storage_dtype {self.storage_dtype!r} is not one of "
                              f"{', '.join(STORAGE_DTYPES)}")


# ---------------------------------------------------------------------- collection
def _check_contexts(contexts: Tensor) -> Tensor:
    if not isinstance(contexts, Tensor) or contexts.ndim != 2 or contexts.dtype != torch.long:
        raise ConfigError("contexts must be an int64 tensor [n_contexts, context_length]")
    if contexts.shape[0] == 0:
        raise ConfigError("no contexts to collect activations from")
    return contexts


def iter_model_activations(model: Any, contexts: Tensor, layers: Sequence[int], input_site: str = "mlp_in",
                           output_site: str = "mlp_out", batch_contexts: int = 8,
                           exclude_bos: bool = True, progress: bool = False,
                           device: str | torch.device | None = None,
                           ) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """Per forward batch, ``{layer: (x [n, d_in], y [n, d_out])}`` with ``n = contexts x positions``
    (position 0 left out when ``exclude_bos``). Runs under ``torch.inference_mode``."""
    adapter: ModelAdapter = get_adapter(model)
    contexts = _check_contexts(contexts)
    if device is None:
        device = next(adapter.model.parameters()).device
    sites = [(int(l), s) for l in layers for s in (input_site, output_site)]
    start = 1 if exclude_bos else 0
    if contexts.shape[1] <= start:
        raise ConfigError("contexts are too short to leave out BOS")
    n = contexts.shape[0]
    bar = tqdm(total=n * (contexts.shape[1] - start), unit="tok", desc="activations",
               disable=not progress, leave=False)
    try:
        for i in range(0, n, batch_contexts):
            ids = contexts[i:i + batch_contexts].to(device)
            with torch.inference_mode():
                cache = adapter.run_with_cache(ids, sites, stop_early=True)
            out = {}
            for layer in layers:
                x = cache[(int(layer), input_site)][:, start:]
                y = cache[(int(layer), output_site)][:, start:]
                out[int(layer)] = (x.reshape(-1, x.shape[-1]).clone(), y.reshape(-1, y.shape[-1]).clone())
            bar.update(ids.shape[0] * (contexts.shape[1] - start))
            yield out
    finally:
        bar.close()


class ShuffleBuffer:
    """A fixed-capacity buffer of row-aligned tensors that releases rows in random order.

    When full, it permutes its rows, releases half of them and keeps the other half to mix with
    what comes next; :meth:`flush` releases the rest. Every row added is released exactly once.
    """

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        if capacity < 2:
            raise ConfigError(f"shuffle buffer capacity must be >= 2, got {capacity}")
        self.capacity = capacity
        self.generator = generator or torch.Generator().manual_seed(0)
        self._store: list[Tensor] | None = None
        self.size = 0

    def add(self, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
        """Add rows (tensors with equal first dim); return the chunks released meanwhile."""
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ConfigError("tensors added to a shuffle buffer must have the same number of rows")
        if self._store is None:
            self._store = [t.new_empty((self.capacity, *t.shape[1:])) for t in tensors]
        released = []
        pos = 0
        while pos < n:
            take = min(n - pos, self.capacity - self.size)
            for s, t in zip(self._store, tensors):
                s[self.size:self.size + take] = t[pos:pos + take]
            self.size += take
            pos += take
            if self.size == self.capacity:
                released.append(self._release(self.capacity // 2))
        return released

    def _release(self, count: int) -> tuple[Tensor, ...]:
        assert self._store is not None
        perm = torch.randperm(self.size, generator=self.generator)
        out = tuple(s[perm[:count]].clone() for s in self._store)
        keep = perm[count:]
        for s in self._store:
            s[: keep.numel()] = s[keep].clone()
        self.size = keep.numel()
        return out

    def flush(self) -> list[tuple[Tensor, ...]]:
        """Release every remaining row (shuffled)."""
        if self._store is None or self.size == 0:
            return []
        return [self._release(self.size)]


# ---------------------------------------------------------------------- disk cache
def write_activation_cache(model: Any, contexts: Tensor, cfg: ActivationConfig, folder: str | os.PathLike[str],
                           model_name: str = "", progress: bool = True,
                           extra: dict[str, Any] | None = None) -> Path:
    """Collect ``cfg.layers`` in one pass over ``contexts`` and write shuffled shards to ``folder``
    (replaced whole, atomically). Returns the folder."""
    adapter = get_adapter(model)
    contexts = _check_contexts(contexts)
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
        self.index = index
        self.layers: list[int] = [int(l) for l in index["layers"]]
        self.n_tokens: int = int(index["n_tokens"])
        self.d_in: int = int(index["d_in"])
        self.d_out: int = int(index["d_out"])

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


def _perm(n: int, *keys: int) -> Tensor:
    g = torch.Generator().manual_seed(hash_keys(*keys))
    return torch.randperm(n, generator=g)


def hash_keys(*keys: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for k in keys:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


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
            shard = int(_perm(self.n_shards, self.seed, self.epoch)[self.shard_pos])
            x, y = self.cache.read_shard(self.layer, shard)
            rows = _perm(x.shape[0], self.seed, self.epoch, shard, 1)
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
        if state.get("kind") != "cached" or int(state.get("layer", -1)) != self.layer:
            raise ConfigError(f"stream state is for another stream ({state.get('kind')}, layer {state.get('layer')})")
        self.seed = int(state["seed"])
        self.epoch, self.shard_pos, self.row_pos = int(state["epoch"]), int(state["shard_pos"]), int(state["row_pos"])
        self.batch_size = int(state.get("batch_size", self.batch_size))
        self._loaded = None


class ModelActivationStream:
    """Endless ``(x, y)`` batches of one layer, computed from the model on the fly.

    Each epoch reads the contexts in a seeded random order, ``batch_contexts`` per forward pass,
    through a :class:`ShuffleBuffer`. The state is (epoch, next context); resuming starts from the
    next unread context with an empty buffer (rows that sat in the buffer at save time are skipped).
    """

    def __init__(self, model: Any, contexts: Tensor, layer: int, cfg: ActivationConfig | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.adapter = get_adapter(model)
        self.contexts = _check_contexts(contexts)
        self.layer = self.adapter.check_layer(int(layer))
        self.cfg = cfg or ActivationConfig(layers=[layer])
        self.device = torch.device(device)
        self.epoch, self.next_context = 0, 0
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self.buffer = ShuffleBuffer(self.cfg.buffer_tokens,
                                    torch.Generator().manual_seed(hash_keys(self.cfg.seed, self.epoch, self.next_context)))
        self._ready: list[tuple[Tensor, Tensor]] = []
        self._ready_rows = 0

    def _order(self) -> Tensor:
        return _perm(self.contexts.shape[0], self.cfg.seed, self.epoch, 2)

    def _fill(self) -> None:
        order = self._order()
        idx = order[self.next_context:self.next_context + self.cfg.batch_contexts]
        self.next_context += idx.numel()
        batch = next(iter_model_activations(self.adapter, self.contexts[idx], [self.layer], self.cfg.input_site,
                                            self.cfg.output_site, self.cfg.batch_contexts, self.cfg.exclude_bos))
        x, y = batch[self.layer]
        chunks = self.buffer.add(x, y)
        if self.next_context >= self.contexts.shape[0]:
            chunks += self.buffer.flush()
            self.epoch += 1
            self.next_context = 0
        for cx, cy in chunks:
            self._ready.append((cx, cy))
            self._ready_rows += cx.shape[0]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        while self._ready_rows < self.cfg.batch_size:
            self._fill()
        xs = torch.cat([r[0] for r in self._ready])
        ys = torch.cat([r[1] for r in self._ready])
        b = self.cfg.batch_size
        self._ready = [(xs[b:], ys[b:])] if xs.shape[0] > b else []
        self._ready_rows = xs.shape[0] - b
        return xs[:b].to(self.device), ys[:b].to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "model", "layer": self.layer, "seed": self.cfg.seed, "epoch": self.epoch,
                "next_context": self.next_context}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "model" or int(state.get("layer", -1)) != self.layer:
            raise ConfigError(f"stream state is for another stream ({state.get('kind')}, layer {state.get('layer')})")
        self.cfg.seed = int(state["seed"])
        self.epoch, self.next_context = int(state["epoch"]), int(state["next_context"])
        self._reset_buffer()
