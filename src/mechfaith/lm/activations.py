"""Activations captured from a model: (input, target) pairs of one or several layers in one pass.

- :class:`ActivationConfig`: what to collect and how to batch, shuffle and store it.
- :func:`iter_model_activations` runs the model over token contexts and yields, per forward batch,
  ``{layer: (x [n, d_in], y [n, d_out])}`` at the configured sites. The forward pass stops right
  after the last activation needed (a hook raises :class:`~mechfaith.lm.adapters.StopForward`), so
  collecting layer 15 of 30 costs about half a forward pass.
- :class:`ShuffleBuffer` mixes rows from many contexts: memory is bounded by its capacity, not by
  the corpus.
- The batch stream straight from the model is :class:`mechfaith.lm.model_stream.ModelActivationStream`.
- :func:`hash_keys` / :func:`seeded_perm`: stable seeds and permutations shared with the on-disk
  cache's stream (:mod:`mechfaith.lm.activation_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechfaith.configs import doc
from mechfaith.errors import ConfigError
from mechfaith.lm.adapters import INPUT_SITES, OUTPUT_SITES, ModelAdapter, get_adapter

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
def check_contexts(contexts: Tensor) -> Tensor:
    """``contexts`` if it is a non-empty int64 tensor [n_contexts, context_length]; else ConfigError."""
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
    contexts = check_contexts(contexts)
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


def seeded_perm(n: int, *keys: int) -> Tensor:
    """A random permutation of ``range(n)`` seeded by :func:`hash_keys` of ``keys``."""
    g = torch.Generator().manual_seed(hash_keys(*keys))
    return torch.randperm(n, generator=g)


def hash_keys(*keys: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for k in keys:
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
