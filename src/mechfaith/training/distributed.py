"""Data-parallel training with ``torch.distributed`` (gloo on CPU, NCCL on GPUs), launched by torchrun.

Every process (rank) holds the whole coder and its own Adam; per step:

1. each rank reads the *same* global batch from a deterministic stream (same seed, same position)
   and keeps its contiguous slice of ``global_batch / world_size`` rows (:class:`ShardedStream`);
2. forward and backward on that slice;
3. the gradients are averaged over ranks (one all-reduce of a flat buffer) before the gradient
   norm, clipping and the Adam step, so every rank applies the same update and the weights stay
   identical (the initial weights are broadcast from rank 0 by :func:`attach`);
4. the latents that fired (for the dead-latent tracker) are OR-ed over ranks, and the logged
   metrics (loss, MSE, L0, ...) are averaged over ranks in the step's one host synchronisation, so
   a NaN on any rank stops every rank at the same step;
5. rank 0 alone writes the JSONL log and the checkpoints; every rank resumes from them (the folder
   must be visible to all ranks, e.g. a shared file system).

Since the reconstruction and sparsity terms are means over the batch, averaging the per-rank
gradients of equal-sized slices gives exactly the gradient of the global batch: N processes with
global batch B train the same weights as one process with batch B (up to float rounding; a test
checks 2 processes against 1). Jacobian matching too: each rank draws the global batch's probes
(as one process would) and keeps its rows' (:func:`~mechfaith.training.jacobian_matching.global_probes`).
Exceptions: BatchTopK picks its top ``k * batch`` per rank slice (its
inference threshold is averaged over ranks after each step) and the AuxK loss normalises by the
rank's own residual variance; both are still valid data-parallel training, not bit-equal to one
process.

A checkpoint written by a data-parallel run holds the global stream's position, so it resumes
with any number of processes (with the same global batch) or with one.

Collection of activations split by rank: :func:`rank_slice` gives each rank its share of the
contexts, :func:`collect_by_rank` runs a collection function on it into ``folder/rank_XXX`` and
rank 0 then writes ``folder/index.json`` listing every part's shards (:func:`merge_activation_parts`),
so the folder opens as one activation cache.

See ``docs/distributed.md`` for how to launch on one multi-GPU machine and on several machines.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from mechfaith.coders.files import read_json, write_json
from mechfaith.errors import CoderFileError, ConfigError, InputError
from mechfaith.training import checkpoint as ckpt
from mechfaith.training.clt_trainer import CLTTrainer
from mechfaith.training.streams import BatchStream, as_stream
from mechfaith.training.trainer import Trainer, TrainResult

AnyTrainer = TypeVar("AnyTrainer", Trainer, CLTTrainer)

log = logging.getLogger(__name__)

PART_PREFIX = "rank_"
INDEX_NAME = "index.json"


@dataclass
class DistContext:
    """Where this process stands in the group (a single process when ``world_size == 1``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # 'gloo' | 'nccl' | None (no process group)
    owns_group: bool = False  # init_distributed created the process group (destroy() ends it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, checkpoints and merged indexes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.distributed and dist.is_initialized():
            if self.backend == "nccl":
                dist.barrier(device_ids=[torch.device(self.device).index or 0])
            else:
                dist.barrier()


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(backend: str | None = None, *, device: str | None = None,
                     timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without
    ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) it returns a single-process context and creates no
    group, so the same script runs with or without torchrun. ``backend``: None picks NCCL when
    CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``) and gloo otherwise.
    ``device``: force a device ("cpu" selects gloo). An existing process group is reused.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    use_cuda = torch.cuda.is_available() and backend != "gloo" and (device is None or device.startswith("cuda"))
    if device is None:
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if backend is None:
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"distributed backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not device.startswith("cuda"):
        raise ConfigError("the nccl backend needs CUDA devices; use gloo on CPU")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world == 1:
        return DistContext(0, 1, local_rank, device, None, False)
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise ConfigError("a process group with another rank/world size is already initialised")
        return DistContext(rank, world, local_rank, device, dist.get_backend(), False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(f"environment variable {name} is not set (launch with torchrun)")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    log.info("rank %d of %d joined (%s, %s)", rank, world, backend, device)
    return DistContext(rank, world, local_rank, device, backend, True)


def destroy(ctx: DistContext) -> None:
    """End the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        ctx.owns_group = False


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"bad rank {rank} of world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


# ---------------------------------------------------------------------------------------------- data
class ShardedStream:
    """This rank's rows of each global batch of ``stream`` (every rank reads the same batches).

    The global batch size must be divisible by the world size (equal slices keep the averaged
    gradient equal to the global batch's). The state is the wrapped stream's own (the global
    position), so checkpoints resume with any world size or with a single process. ``row_dim``:
    the dimension that holds the rows (0; 1 for a CLT's layer-major batches [L, B, d]).
    """

    def __init__(self, stream: Any, rank: int, world_size: int, row_dim: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"bad rank {rank} of world size {world_size}")
        self.stream: BatchStream = as_stream(stream)
        self.rank, self.world_size, self.row_dim = rank, world_size, row_dim

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        x, y = self.stream.next_batch()
        b = x.shape[self.row_dim]
        if b % self.world_size:
            raise InputError(f"the global batch has {b} rows, not divisible by the {self.world_size} "
                             f"processes; choose a batch size that is a multiple of the world size")
        per = b // self.world_size
        start = self.rank * per
        return x.narrow(self.row_dim, start, per), (y.narrow(self.row_dim, start, per) if y is not None else None)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- sync
class GradientSync:
    """The trainer's data-parallel hook (``Trainer.sync``): collectives over the default group."""

    def __init__(self, world_size: int, checkpoint_dir: Path | None = None, rank: int = 0) -> None:
        self.world_size = world_size
        self.rank = rank
        self.checkpoint_dir = checkpoint_dir  # rank 0's folder, for resuming on every rank

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients over ranks in place (one all-reduce of a flat buffer)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def reduce_fired(self, fired: Tensor) -> Tensor:
        """Latents [n] (bool) that fired on any rank."""
        t = fired.to(torch.uint8)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.bool()

    def global_rows(self, rows: int) -> int:
        """Rows of the step over all ranks (every rank has an equal slice)."""
        return rows * self.world_size

    def reduce_values(self, values: Tensor) -> Tensor:
        """Means over ranks of the step's scalars (loss, metrics)."""
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size

    @torch.no_grad()
    def after_step(self, coder: torch.nn.Module) -> None:
        """Average BatchTopK's inference threshold (a buffer each rank updates from its own slice)."""
        if getattr(getattr(coder, "cfg", None), "activation", None) != "batchtopk":
            return
        for buf in coder.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(self.world_size)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def attach(trainer: AnyTrainer, ctx: DistContext) -> AnyTrainer:
    """Make ``trainer`` train data-parallel in the group of ``ctx`` (no-op for one process).

    Broadcasts the coder's weights from rank 0, installs the gradient/metric averaging hook, and
    turns off the log file, checkpoints and progress bar on ranks other than 0.
    """
    if not ctx.distributed:
        return trainer
    if not dist.is_initialized():
        raise ConfigError("attach: no process group (call init_distributed first)")
    if trainer.step_count:
        raise ConfigError("attach the trainer to the group before its first step")
    broadcast_module(trainer.coder)
    trainer.sync = GradientSync(ctx.world_size, trainer.checkpoint_dir, ctx.rank)
    if not ctx.is_main:
        trainer.log_path = None
        trainer.checkpoint_dir = None
        trainer.progress = False
    return trainer


def fit(trainer: Trainer | CLTTrainer, stream: Any, ctx: DistContext, *, shard: bool = True,
        resume: bool | str = False, on_log: Callable[[dict[str, Any]], None] | None = None,
        row_dim: int = 0) -> TrainResult:
    """:meth:`Trainer.fit` on every rank of the group (after :func:`attach`).

    ``stream``: with ``shard=True`` the *global* stream (same seed on every rank), of which each
    rank trains on its slice (:class:`ShardedStream`, rows along ``row_dim``: 1 for a
    :class:`~mechfaith.training.clt_trainer.CLTTrainer`); with ``shard=False`` a stream that already
    yields this rank's own batches (e.g. activations computed from the rank's share of contexts).
    ``resume``: True or "auto" as in :meth:`Trainer.fit`; every rank reads rank 0's checkpoint
    folder (which must be reachable from every rank).
    """
    source: BatchStream = ShardedStream(stream, ctx.rank, ctx.world_size, row_dim) if shard else as_stream(stream)
    if not ctx.distributed:
        return trainer.fit(source, resume=resume, on_log=on_log)
    sync = trainer.sync
    if not isinstance(sync, GradientSync):
        raise ConfigError("fit: call attach(trainer, ctx) first")
    folder = sync.checkpoint_dir
    if resume == "auto":
        flag = [folder is not None and ckpt.is_checkpoint(folder)]
        dist.broadcast_object_list(flag, src=0)  # rank 0 decides for everyone
        resume = bool(flag[0])
    elif not isinstance(resume, bool):
        raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
    if resume:
        if folder is None:
            raise ConfigError("resume needs a checkpoint folder")
        trainer.load_checkpoint(folder, source)
    ctx.barrier()  # nobody writes a new checkpoint while another rank still reads the old one
    result = trainer.fit(source, resume=False, on_log=on_log)
    ctx.barrier()
    return result


# ---------------------------------------------------------------------------------------------- collection
def part_folder(folder: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` writes its part of a collection."""
    return Path(folder) / f"{PART_PREFIX}{rank:03d}"


_SAME_KEYS = ("format", "format_version", "layers", "input_site", "output_site", "d_in", "d_out",
              "dtype", "exclude_bos", "context_length", "family", "model")


def merge_activation_parts(folder: str | os.PathLike[str], n_parts: int) -> Path:
    """Write ``folder/index.json`` listing the shards of ``folder/rank_000 .. rank_{n-1}``.

    Each part is an activation cache (``mechfaith.lm.activation_cache.write_activation_cache``); the
    merged index is the first part's with every shard path prefixed by its part's folder and the
    token and context counts summed, so ``ActivationCache(folder)`` reads all parts as one.
    """
    folder = Path(folder)
    parts = [read_json(part_folder(folder, r) / INDEX_NAME) for r in range(n_parts)]
    first = parts[0]
    if not isinstance(first, dict) or "shards" not in first:
        raise CoderFileError(part_folder(folder, 0) / INDEX_NAME, "not an activation cache index")
    merged = dict(first)
    shards: dict[str, list[dict[str, Any]]] = {k: [] for k in first["shards"]}
    for r, part in enumerate(parts):
        where = part_folder(folder, r) / INDEX_NAME
        for key in _SAME_KEYS:
            if part.get(key) != first.get(key):
                raise CoderFileError(where, f"{key} = {part.get(key)!r} differs from part 0's "
                                            f"{first.get(key)!r}")
        for layer, items in part["shards"].items():
            for info in items:
                shards[layer].append({**info, "file": f"{part_folder(folder, r).name}/{info['file']}"})
    merged["shards"] = shards
    merged["n_tokens"] = sum(int(p["n_tokens"]) for p in parts)
    merged["n_contexts"] = sum(int(p.get("n_contexts", 0)) for p in parts)
    merged["extra"] = {**(first.get("extra") or {}), "parts": [part_folder(folder, r).name for r in range(n_parts)]}
    write_json(folder / INDEX_NAME, merged)
    return folder


def collect_by_rank(collect: Callable[[slice, Path], Any], n_items: int, folder: str | os.PathLike[str],
                    ctx: DistContext) -> Path:
    """Split a collection of ``n_items`` (e.g. contexts) over the ranks and merge the result.

    ``collect(items, part)`` writes an activation cache of the items ``items`` (a slice) into the
    folder ``part``, e.g. ``lambda s, p: write_activation_cache(model, contexts[s], cfg, p)``.
    Rank r collects :func:`rank_slice` of the items into ``folder/rank_r``; after a barrier rank 0
    writes the merged index. With one process, the single part is indexed the same way.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    collect(rank_slice(n_items, ctx.rank, ctx.world_size), part_folder(folder, ctx.rank))
    ctx.barrier()
    if ctx.is_main:
        merge_activation_parts(folder, ctx.world_size)
    ctx.barrier()
    return folder
