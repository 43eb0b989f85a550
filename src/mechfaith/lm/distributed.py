"""A set's layers shared among torchrun processes (``torchrun ... -m mechfaith lm train --layers``).

Under torchrun (``WORLD_SIZE`` > 1) or inside an initialised ``torch.distributed`` process group,
:func:`~mechfaith.lm.layer_set.train_set` gives every process (rank) a contiguous share of the
layers: each rank streams (or reads from the cache) only its own layers and trains only their
coders, with the seeds one process would use, so every layer's coder is bit for bit the coder one
process trains (a test checks 2 gloo processes against 1). No gradients or activations cross
ranks; the ranks meet only at the few exchanges of :class:`SetRanks`.

**The split** (:func:`split_layers`): contiguous shares, because the model stream computes only up
to the last layer it needs, so rank r's forward passes stop after its last layer. A share
``layers[i:j]`` costs about ``forward_cost * (last layer + 1) + coder_cost * (j - i)`` per training
row (the forward pass up to its last layer plus the coders' training; :func:`share_costs` estimates
both from the parameter counts: a block's forward pass ~ its parameters, a coder's training step
~ 3x its parameters, doubled by Jacobian matching); the split minimises the most expensive share
(then the sum of squared costs, then gives earlier ranks the extra layer). Early ranks, whose
forward passes are short, thus take a few more layers. From a cache (``activations=``) reading
costs the same at every layer, so the shares are plain balanced chunks. With more ranks than
layers the last ranks get none and only take part in the exchanges.

**Process group**: an initialised group is used as it is; otherwise torchrun's ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) start one (gloo on CPU, NCCL
on CUDA, each rank on ``cuda:LOCAL_RANK`` when the device is CUDA), kept for the process's later
sets and ended at exit. The exchanges go through a separate gloo group with a :data:`WAIT_TIMEOUT` of a week: ranks
train independently, so one that finishes early may wait for the slowest one for hours, far beyond
the default 30 minutes of a collective.

**Exchanges and failures** (:meth:`SetRanks.run`): each phase runs a function on every rank, and
every rank then receives every rank's JSON result, or, when any rank failed, every rank raises (the
failing rank its own exception; the others :class:`~mechfaith.errors.TrainingDiverged` for a
diverged layer, else :class:`~mechfaith.errors.PeerFailed`, naming the rank and its message). A
rank catches its own failure (any exception, Ctrl-C included) and still takes part in the
exchange, so no rank waits forever for one that gave up. A rank that dies outright (killed, out of
memory) is stopped with the others by torchrun. The results travel as JSON bytes (no pickle); the
summaries are gathered this way rather than read from the other ranks' ``train.json`` because the
same exchange carries each rank's success or failure, and rank 0 then needs no view of files that
other machines just wrote (shared file systems may show them late).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from mechfaith.errors import ConfigError, PeerFailed, TrainingDiverged
from mechfaith.lm.adapters import ModelAdapter
from mechfaith.lm.config import LMCoderConfig
from mechfaith.training import distributed as ddp
from mechfaith.training.config import TrainConfig

log = logging.getLogger(__name__)

WAIT_TIMEOUT = datetime.timedelta(days=7)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return " ".join((str(exc).strip() or type(exc).__name__).split())


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


@dataclass
class SetRanks:
    """This process's place among the ranks sharing a set (one process: rank 0 of 1, no group)."""

    ctx: ddp.DistContext = field(default_factory=ddp.DistContext)
    device: str = "cpu"  # where this rank computes (cuda:LOCAL_RANK under torchrun on GPUs)
    group: Any = None  # the gloo group of the exchanges (None for one process)

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def _exchange(self, data: bytes) -> list[Any]:
        """Every rank's JSON ``data``, decoded, in rank order (two all-gathers: sizes, then bytes)."""
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        width = max(int(s.item()) for s in sizes)
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        return [json.loads(p[:int(s.item())].numpy().tobytes()) for p, s in zip(parts, sizes)]

    def run(self, fn: Callable[[], Any]) -> list[Any]:
        """``fn()`` on this rank; every rank's result (JSON values) in rank order, or, if any rank
        failed, an exception on every rank (see the module docstring). One process: ``[fn()]``."""
        if self.group is None:
            return [fn()]
        error: BaseException | None = None
        try:
            data = _encode({"ok": True, "value": fn()})
        except BaseException as exc:  # noqa: BLE001 -- reported to the other ranks, then re-raised
            error = exc
            data = _encode({"ok": False, "diverged": isinstance(exc, TrainingDiverged), "message": _one_line(exc)})
        try:
            outcomes = self._exchange(data)
        except Exception:
            if error is not None:
                raise error from None  # this rank's own failure says more than the failed exchange
            raise
        if error is not None:
            raise error
        failed = [(r, o) for r, o in enumerate(outcomes) if not o["ok"]]
        if failed:
            r, o = failed[0]
            more = f" (and {', '.join(f'rank {f[0]}' for f in failed[1:])})" if len(failed) > 1 else ""
            if o["diverged"]:
                raise TrainingDiverged(f"training diverged on rank {r} of {self.world_size}{more}: {o['message']}")
            raise PeerFailed(f"rank {r} of {self.world_size} failed{more}: {o['message']}")
        return [o["value"] for o in outcomes]

    def close(self) -> None:
        """End the exchange group (a process group :func:`join_ranks` started lasts until exit)."""
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None


def _rank_device(device: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if device.startswith("cuda") else device


def join_ranks(device: str) -> SetRanks:
    """This process's :class:`SetRanks`: from the initialised process group, else from torchrun's
    environment (starting the group when ``WORLD_SIZE`` > 1), else one process on ``device``."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        if world > 1:
            device = _rank_device(device, local)
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
        ctx = ddp.DistContext(rank, world, local, device, str(dist.get_backend()), owns_group=False)
    else:
        try:
            world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise ConfigError("WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
        if world <= 1:
            return SetRanks(ddp.DistContext(device=device), device)
        device = _rank_device(device, local)
        ctx = ddp.init_distributed(device=device)
        if ctx.owns_group:  # kept for this process's later sets (re-starting a group is fragile)
            atexit.register(ddp.destroy, ctx)
    if ctx.world_size <= 1:
        return SetRanks(ctx, device)
    group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    log.info("rank %d of %d trains its share of the set on %s", ctx.rank, ctx.world_size, device)
    return SetRanks(ctx, device, group)


def is_main_process() -> bool:
    """Whether this process is rank 0 (of the initialised group, else by torchrun's ``RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0").strip() in ("", "0")


def share_costs(adapter: ModelAdapter, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
                streamed: bool) -> tuple[int, int]:
    """``(forward_cost, coder_cost)`` per training row for :func:`split_layers`, in multiply-adds:
    a block's forward pass ~ its parameter count (0 when the rows come from a cache), a coder's
    training step ~ 3x its parameters (forward and backward), twice that with Jacobian matching."""
    d = adapter.d_model
    ccfg = coder_cfg.coder_config(d, d)
    d_out = ccfg.d_out or ccfg.d_in
    coder = ccfg.n_latents * (ccfg.d_in + d_out) + (ccfg.d_in * d_out if ccfg.skip else 0)
    coder_cost = 3 * coder * (2 if train_cfg.jacobian_coef > 0 else 1)
    forward = sum(p.numel() for p in adapter.block(0).parameters()) if streamed else 0
    return int(forward), int(max(coder_cost, 1))


def split_layers(layers: Sequence[int], world_size: int, *, forward_cost: int = 0,
                 coder_cost: int = 1) -> list[list[int]]:
    """``layers`` (sorted, distinct) in ``world_size`` contiguous shares, one per rank, balanced by
    cost (module docstring): the most expensive share is as cheap as possible, then the sum of the
    squared costs is smallest, then earlier ranks hold more layers. Every rank gets a layer when
    there are enough; costs are integers, so every rank computes the very same split."""
    layers = sorted(set(int(l) for l in layers))
    if world_size < 1 or forward_cost < 0 or coder_cost < 1:
        raise ConfigError(f"split_layers: bad world size {world_size} or costs {forward_cost}, {coder_cost}")
    n = len(layers)
    if n <= world_size:
        return [[l] for l in layers] + [[] for _ in range(world_size - n)]

    def cost(i: int, j: int) -> int:  # the share layers[i:j]
        return forward_cost * (layers[j - 1] + 1) + coder_cost * (j - i)

    def table(value: Callable[[int, int, int], int | None]) -> list[list[int | None]]:
        """best[w][j]: the best value of layers[:j] in w shares (None: impossible)."""
        best: list[list[int | None]] = [[0] + [None] * n] + [[None] * (n + 1) for _ in range(world_size)]
        for w in range(1, world_size + 1):
            for j in range(w, n - (world_size - w) + 1):  # leave a layer for every later rank
                options = [v for i in range(w - 1, j) if (prev := best[w - 1][i]) is not None
                           and (v := value(prev, i, j)) is not None]
                best[w][j] = min(options) if options else None
        return best

    most = table(lambda prev, i, j: max(prev, cost(i, j)))[world_size][n] or 0

    def squares(prev: int, i: int, j: int) -> int | None:
        c = cost(i, j)
        return prev + c * c if c <= most else None

    best = table(squares)
    shares: list[list[int]] = []
    j = n
    for w in range(world_size, 0, -1):  # from the last share: the latest start that stays optimal
        i = max(i for i in range(w - 1, j) if (prev := best[w - 1][i]) is not None
                and squares(prev, i, j) == best[w][j])
        shares.append(layers[i:j])
        j = i
    return shares[::-1]
