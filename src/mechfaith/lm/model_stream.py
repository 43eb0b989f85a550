"""Training batches of one or several layers computed from the model on the fly (no disk cache).

:class:`ModelActivationStream` is the model-side twin of
:class:`~mechfaith.lm.activation_cache.CachedActivationStream`: where the cached stream reads a
shard, this one computes a *block* (``buffer_tokens`` rows: the contexts that fill it, in one
forward pass per ``batch_contexts`` that stops after the last requested layer and captures every
layer at once), shuffles the block's rows with a seeded permutation, and serves batches from it,
across block and epoch boundaries. Epoch ``e`` visits the contexts in a seeded random order.

``max_norm_ratio`` > 0 leaves out of a block the rows whose output-site norm exceeds that multiple
of the block's median at any of the layers: the attention-sink tokens with "massive activations"
(in SmolLM2-135M, MLP outputs of norm about 25,000 at layer 11 against a median of 30, at BOS and
at the first token of some contexts). A coder cannot and need not learn them, and a single such
row dominates a batch's squared error. The same rows are left out at every layer, so the layers
stay aligned (a one-layer stream decides from its own layer alone).

Memory is one block of every layer (``buffer_tokens x n_layers x (d_in + d_out)`` values: 1.1 GB
of float32 for SmolLM2-135M's 30 layers at 8192 rows), whatever the corpus size.

The position (epoch, block, row) is the whole state, so :meth:`ModelActivationStream.load_state_dict`
resumes exactly: the block in progress is recomputed (the forward pass is deterministic on CPU),
and a resumed run sees the very rows an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from mechfaith.errors import ConfigError
from mechfaith.lm.activations import ActivationConfig, check_contexts, iter_model_activations, seeded_perm
from mechfaith.lm.adapters import get_adapter


class ModelActivationStream:
    """Endless batches computed from the model: ``(x, y)`` for one layer (``layers`` an int), or
    ``((x_l, ...), (y_l, ...))`` in the order of ``layers`` (a sequence). See the module docstring."""

    def __init__(self, model: Any, contexts: Tensor, layers: int | Sequence[int], cfg: ActivationConfig | None = None,
                 device: str | torch.device = "cpu", max_norm_ratio: float = 0.0) -> None:
        self.adapter = get_adapter(model)
        self.contexts = check_contexts(contexts)
        self.single = isinstance(layers, int)
        wanted = [int(layers)] if isinstance(layers, int) else [int(l) for l in layers]
        self.layers = [self.adapter.check_layer(l) for l in wanted]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"a model stream needs distinct layers, got {wanted}")
        self.cfg = cfg or ActivationConfig(layers=list(self.layers))
        per_context = self.contexts.shape[1] - (1 if self.cfg.exclude_bos else 0)
        if per_context <= 0:
            raise ConfigError("contexts are too short to leave out BOS")
        self.block_contexts = max(1, self.cfg.buffer_tokens // per_context)
        self.n_blocks = math.ceil(self.contexts.shape[0] / self.block_contexts)
        self.device = torch.device(device)
        if max_norm_ratio < 0:
            raise ConfigError(f"max_norm_ratio must be >= 0, got {max_norm_ratio}")
        self.max_norm_ratio = float(max_norm_ratio)
        self.rows_seen = self.rows_dropped = 0  # rows computed, and left out as massive (since construction)
        self.epoch, self.block, self.row = 0, 0, 0
        self._loaded: tuple[int, int, list[tuple[Tensor, Tensor]]] | None = None  # (epoch, block, rows per layer)

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def _compute(self, epoch: int, block: int) -> list[tuple[Tensor, Tensor]]:
        order = seeded_perm(self.contexts.shape[0], self.cfg.seed, epoch, 2)
        idx = order[block * self.block_contexts:(block + 1) * self.block_contexts]
        parts = list(iter_model_activations(self.adapter, self.contexts[idx], self.layers, self.cfg.input_site,
                                            self.cfg.output_site, self.cfg.batch_contexts, self.cfg.exclude_bos))
        raw: list[tuple[Tensor, Tensor]] = []
        keep: Tensor | None = None
        for layer in self.layers:
            x = torch.cat([p[layer][0] for p in parts]) if len(parts) > 1 else parts[0][layer][0]
            y = torch.cat([p[layer][1] for p in parts]) if len(parts) > 1 else parts[0][layer][1]
            for p in parts:  # free this layer's captures as soon as they are in the block
                del p[layer]
            if self.max_norm_ratio > 0:
                norms = y.norm(dim=1)
                ok = norms <= self.max_norm_ratio * norms.median()
                keep = ok if keep is None else keep & ok
            raw.append((x, y))
        kept = torch.arange(raw[0][0].shape[0]) if keep is None else keep.nonzero().squeeze(1).cpu()
        self.rows_seen += raw[0][0].shape[0]
        self.rows_dropped += raw[0][0].shape[0] - kept.numel()
        perm = kept[seeded_perm(kept.numel(), self.cfg.seed, epoch, block, 3)].to(raw[0][0].device)
        rows = []
        while raw:
            x, y = raw.pop(0)
            rows.append((x[perm], y[perm]))
        return rows

    def current_block(self) -> list[tuple[Tensor, Tensor]]:
        """The rows of the block the next batch starts in, per layer (computed once, then kept)."""
        key = (self.epoch, self.block)
        if self._loaded is None or self._loaded[:2] != key:
            self._loaded = None  # free the finished block before computing the next one
            self._loaded = (self.epoch, self.block, self._compute(*key))
        return self._loaded[2]

    def next_batch(self) -> Any:
        """The next batch on the stream's device (see the class docstring for its shape)."""
        pieces: list[list[tuple[Tensor, Tensor]]] = []
        need = self.cfg.batch_size
        while need > 0:
            rows = self.current_block()
            n = rows[0][0].shape[0]
            take = min(need, n - self.row)
            pieces.append([(x[self.row:self.row + take], y[self.row:self.row + take]) for x, y in rows])
            need -= take
            self.row += take
            if self.row >= n:
                self.row = 0
                self.block += 1
                if self.block >= self.n_blocks:
                    self.block, self.epoch = 0, self.epoch + 1
        xs = tuple(torch.cat([p[i][0] for p in pieces]).to(self.device) for i in range(len(self.layers)))
        ys = tuple(torch.cat([p[i][1] for p in pieces]).to(self.device) for i in range(len(self.layers)))
        return (xs[0], ys[0]) if self.single else (xs, ys)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "model", "layers": list(self.layers), "seed": self.cfg.seed, "epoch": self.epoch,
                "block": self.block, "row": self.row, "block_contexts": self.block_contexts,
                "batch_size": self.cfg.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "model" or state.get("layers") != list(self.layers):
            raise ConfigError(f"the stream state is not one of a model stream of layers {self.layers} "
                              f"({state.get('kind')}, layers {state.get('layers')})")
        if int(state.get("block_contexts", -1)) != self.block_contexts:
            raise ConfigError(f"the stream state was saved with blocks of {state.get('block_contexts')} contexts, "
                              f"this stream has {self.block_contexts} (another buffer_tokens or context length)")
        self.cfg.seed = int(state["seed"])
        self.cfg.batch_size = int(state.get("batch_size", self.cfg.batch_size))
        self.epoch, self.block, self.row = int(state["epoch"]), int(state["block"]), int(state["row"])
        self._loaded = None
