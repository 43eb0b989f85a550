"""The training engine: one loop that trains any number of members from one stream of batches.

A *member* is anything that can take an optimiser step in two phases: a :class:`~mechfaith.training.
trainer.Trainer` (one :class:`~mechfaith.coders.SparseCoder`, every feature: Jacobian matching,
AuxK, checkpoints, data-parallel sync) or a :class:`~mechfaith.training.stack_trainer.StackTrainer`
(K small coders stacked into one batched model: the toy's grid, a sweep). Each member keeps its own
optimiser, schedules, dead-latent state and random numbers; the engine owns the loop.

One step of the engine (:func:`run_step`):

1. every member runs its forward and backward pass on its batch (:meth:`EngineMember.begin_step`)
   and puts the values to check and log into one float64 tensor;
2. one host synchronisation reads all members' values at once;
3. if any member's loss or gradient norm is NaN/inf, no member is updated and the step raises
   :class:`~mechfaith.errors.TrainingDiverged` (or :class:`~mechfaith.errors.InputError` when the
   batch itself held NaN/inf), naming the member;
4. otherwise every member applies its update (:meth:`EngineMember.finish_step`).

A batch from the stream is either shared by every member (``(x, y)``) or a tuple/list with one
``(x, y)`` per member (one model forward pass that captured several layers feeds one coder each).

:class:`Engine` adds the loop around the steps: progress bar with rate and ETA, JSONL logs, periodic
checkpoints (a single member writes into the checkpoint folder itself; several members write one
sub-folder each, named by member), exact resume, and the ``on_log`` callback. A member trains in
the engine exactly as it would alone with the same batches, which the tests check.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechfaith.atomic import write_text_atomic
from mechfaith.errors import ConfigError, InputError, TrainingDiverged
from mechfaith.jsonio import json_safe, loads_json
from mechfaith.training import checkpoint as ckpt
from mechfaith.training.streams import BatchStream, as_stream

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """How one member's training ended."""

    status: str  # 'completed' | 'diverged'
    steps_done: int  # steps done in total (resumed ones included)
    tokens_seen: int
    final_metrics: dict[str, Any] = field(default_factory=dict)  # the last log record
    message: str = ""  # why it diverged, or that the stream ran out
    elapsed_s: float = 0.0  # training time, resumed runs included
    stream_exhausted: bool = False  # the stream ended before n_steps
    checkpoint_dir: Path | None = None
    log_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


@dataclass
class PendingStep:
    """A member's step between its backward pass and its update."""

    names: list[str]  # what ``values`` holds, in order; the first two are 'loss' and 'grad_norm'
    values: Tensor  # float64 [len(names)] (flattened per-member lists for stacks), on the device
    state: Any  # whatever the member needs to finish the step
    batch: tuple[Any, Any]  # the batch as given (for the message when it holds NaN/inf)


class EngineMember:
    """What the engine needs from a member; :class:`Trainer` and :class:`StackTrainer` implement it.

    Subclasses set ``name``, ``n_steps``, ``log_every``, ``progress``, ``desc``, ``log_path``,
    ``checkpoint_dir``, ``step_count``, ``tokens_seen``, ``elapsed_s``, ``metrics_history`` and
    ``pending_stream_state``, and implement the abstract methods below.
    """

    name: str = "member"
    n_steps: int
    log_every: int
    checkpoint_every: int = 0  # steps between periodic checkpoints (0: only the final one)
    progress: bool = True
    desc: str = "train"
    log_path: Path | None = None
    checkpoint_dir: Path | None = None
    step_count: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    metrics_history: list[dict[str, Any]]
    pending_stream_state: dict[str, Any] | None = None
    sync: Any = None  # a data-parallel hook, or None

    # ---- the step, in two phases
    def begin_step(self, x: Tensor, y: Tensor | None, want_metrics: bool) -> PendingStep:
        raise NotImplementedError

    def nonfinite(self, got: dict[str, Any]) -> str | None:
        """Why this step must not be applied (NaN/inf loss or gradient), or None."""
        bad = [v for k in ("loss", "grad_norm") for v in _flat(got[k]) if not math.isfinite(v)]
        if not bad:
            return None
        return f"loss {got['loss']}, gradient norm {got['grad_norm']}"

    def abort_step(self) -> None:
        raise NotImplementedError

    def finish_step(self, pending: PendingStep, got: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor | None = None, *, metrics: bool | None = None) -> dict[str, Any]:
        """One optimiser step on the batch ``(x, y)`` (``y = None``: the reference's output, or x).

        Returns the step's record: ``step`` (steps done), ``tokens``, ``lr``, ``loss``, ``grad_norm``
        and, on log steps (or when ``metrics`` is True), the metrics (:class:`Trainer`: ``recon``,
        each loss term, ``mse``, ``fve``, ``l0``, ``dead_frac``, ``jacobian_rel``; a stack: lists of
        K values). Raises :class:`InputError` for a bad batch and :class:`TrainingDiverged` when the
        loss or a gradient is NaN/inf; in both cases nothing (weights, Adam, counters) has changed.
        """
        return run_step([self], [(x, y)], metrics)[0]

    def fit(self, stream: Any, *, resume: bool | str = False,
            on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Train until ``n_steps`` steps are done, the stream ends, or the loss diverges.

        ``stream``: a :class:`BatchStream` or any iterable of ``(x, y)`` batches.
        ``resume``: continue from the checkpoint in ``checkpoint_dir`` (weights, Adam, RNGs, the
        stream's position), so the result equals an uninterrupted run's; ``"auto"``: resume when
        ``checkpoint_dir`` holds a checkpoint, else start afresh. An interrupted run
        (exception, Ctrl-C) writes no checkpoint beyond its last periodic one.
        ``on_log``: called with each log record (after it is written), e.g. for a held-out
        evaluation; it must not change the coder. The loop is :class:`Engine`'s, with this member alone.
        """
        return Engine([self]).fit(stream, resume=resume, on_log=on_log)[0]

    # ---- logging and checkpoints
    def is_log_step(self, index: int) -> bool:
        """Whether step ``index`` (0-based) computes metrics: the first, every log_every-th, the last."""
        done = index + 1
        return index == 0 or done % self.log_every == 0 or done == self.n_steps

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows after a log step."""
        return {}

    def save_checkpoint(self, stream: BatchStream | None = None, folder: str | Path | None = None) -> Path:
        raise ConfigError(f"{type(self).__name__} does not write checkpoints")

    def load_checkpoint(self, folder: str | Path | None = None, stream: BatchStream | None = None) -> Any:
        raise ConfigError(f"{type(self).__name__} does not read checkpoints")

    def open_log(self, resumed: bool) -> IO[str] | None:
        """Open the JSONL log for appending; a resumed run first cuts it back to its checkpoint."""
        if self.log_path is None:
            return None
        kept: list[str] = []
        if resumed and self.log_path.is_file():
            for line in self.log_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = loads_json(line)
                except InputError:
                    continue  # a torn or damaged line (cannot happen with whole-line writes, but be safe)
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= self.step_count:
                    kept.append(line)
        # keep only what the checkpoint has seen, so a resumed run's log has each step once
        write_text_atomic(self.log_path, "".join(line + "\n" for line in kept))
        return open(self.log_path, "a", encoding="utf-8")

    @staticmethod
    def write_line(fh: IO[str] | None, record: dict[str, Any]) -> None:
        if fh is None:
            return
        fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # one whole line
        fh.flush()


def _flat(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]


def member_batches(batch: Any, n_members: int) -> list[tuple[Tensor, Tensor | None]]:
    """One ``(x, y)`` per member from a stream's batch: shared, or one per member."""
    x, y = batch
    if isinstance(x, (list, tuple)):
        if len(x) != n_members:
            raise InputError(f"the batch holds inputs for {len(x)} members; the engine trains {n_members}")
        ys = list(y) if isinstance(y, (list, tuple)) else [y] * n_members
        if len(ys) != n_members:
            raise InputError(f"the batch holds targets for {len(ys)} members; the engine trains {n_members}")
        return list(zip(x, ys))
    return [(x, y)] * n_members


def run_step(members: Sequence[EngineMember], batches: Sequence[tuple[Tensor, Tensor | None]],
             metrics: bool | None = None) -> list[dict[str, Any]]:
    """One optimiser step of every member on its batch, with one host synchronisation.

    Raises :class:`InputError` for a bad batch and :class:`TrainingDiverged` when any member's loss
    or gradient is NaN/inf; in both cases no member has changed (weights, Adam, counters).
    """
    pendings: list[PendingStep] = []
    try:
        for m, (x, y) in zip(members, batches):
            want = m.is_log_step(m.step_count) if metrics is None else metrics
            pendings.append(m.begin_step(x, y, want))
    except BaseException:
        for m in members:
            m.abort_step()
        raise
    device = pendings[0].values.device  # members on other devices copy there without a sync
    values = torch.cat([p.values.to(device) for p in pendings]).tolist()  # the one host sync
    gots: list[dict[str, Any]] = []
    at = 0
    for p in pendings:
        n = p.values.numel()
        gots.append(_unflatten(p.names, values[at:at + n], n))
        at += n
    for m, p, got in zip(members, pendings, gots):
        why = m.nonfinite(got)
        if why is None:
            continue
        for mm in members:
            mm.abort_step()
        x, y = p.batch
        where = f"batch of step {m.step_count + 1}" + (f" (member {m.name})" if len(members) > 1 else "")
        if isinstance(x, Tensor) and not bool(torch.isfinite(x).all()):
            raise InputError(f"the {where} holds NaN or inf in x")
        if isinstance(y, Tensor) and not bool(torch.isfinite(y).all()):
            raise InputError(f"the {where} holds NaN or inf in y")
        who = f" (member {m.name})" if len(members) > 1 else ""
        raise TrainingDiverged(f"training diverged at step {m.step_count + 1}{who}: {why}; no update was made")
    return [m.finish_step(p, got) for m, p, got in zip(members, pendings, gots)]


def _unflatten(names: list[str], values: list[float], n: int) -> dict[str, Any]:
    """Scalars per name, or lists of equal length per name (stacks log one value per coder)."""
    if len(names) == n:
        return dict(zip(names, values))
    per = n // len(names)
    return {name: values[i * per:(i + 1) * per] for i, name in enumerate(names)}


class Engine:
    """The loop around :func:`run_step` for members that share ``n_steps`` (see the module docs).

    ``checkpoint_dir`` and ``log_path`` stay per member (set on the members); with several
    members their checkpoints are written and resumed together.
    """

    def __init__(self, members: Sequence[EngineMember], *, progress: bool | None = None,
                 desc: str | None = None) -> None:
        if not members:
            raise ConfigError("the engine needs at least one member")
        steps = {m.n_steps for m in members}
        if len(steps) != 1:
            raise ConfigError(f"the members of one engine must share n_steps, got {sorted(steps)}")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"the members of one engine need distinct names, got {names}")
        self.members = list(members)
        self.n_steps = steps.pop()
        self.progress = members[0].progress if progress is None else progress
        self.desc = members[0].desc if desc is None else desc

    def _resume(self, stream: BatchStream, resume: bool | str) -> bool:
        if resume == "auto":
            resume = all(m.checkpoint_dir is not None and ckpt.is_checkpoint(m.checkpoint_dir)
                         for m in self.members)
        elif not isinstance(resume, bool):
            raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
        if resume:
            if any(m.checkpoint_dir is None for m in self.members):
                raise ConfigError("resume needs a checkpoint folder")
            for i, m in enumerate(self.members):
                m.load_checkpoint(m.checkpoint_dir, stream if i == 0 else None)
            steps = {m.step_count for m in self.members}
            if len(steps) != 1:
                raise ConfigError(f"the members' checkpoints are at different steps {sorted(steps)}; "
                                  f"they cannot resume together")
        else:
            pending = self.members[0].pending_stream_state
            if pending is not None:
                stream.load_state_dict(pending)
            for m in self.members:
                m.pending_stream_state = None
            self._replace_earlier_checkpoints(stream)
        return bool(resume)

    def _replace_earlier_checkpoints(self, stream: BatchStream) -> None:
        """A fresh run whose checkpoint folder holds an earlier run's checkpoint replaces it with its
        own step-0 checkpoint at once: its log is cut at the start, so the earlier checkpoint would
        no longer match the log, and a run diverging before its first checkpoint would leave it to be
        resumed as if it were this run's."""
        if any(m.step_count == 0 and m.checkpoint_dir is not None and ckpt.is_checkpoint(m.checkpoint_dir)
               for m in self.members):
            log.info("replacing the earlier run's checkpoint with this fresh run's")
            self._checkpoint_all(stream)

    def _checkpoint_all(self, stream: BatchStream) -> None:
        for m in self.members:
            if m.checkpoint_dir is not None:
                m.save_checkpoint(stream)

    def fit(self, stream: Any, *, resume: bool | str = False,
            on_log: Callable[[dict[str, Any]], None] | None = None) -> list[TrainResult]:
        """Train until ``n_steps`` steps are done, the stream ends, or a member diverges.

        ``resume``: continue from the members' checkpoints (weights, Adam, RNGs, the stream's
        position), so the result equals an uninterrupted run's; ``"auto"``: resume when every
        member's checkpoint folder holds a checkpoint. ``on_log``: called with each log record
        of the first member (after it is written); it must not change the coders.
        """
        members = self.members
        stream = as_stream(stream)
        resumed = self._resume(stream, resume)
        status, message, exhausted = "completed", "", False
        handles = [m.open_log(resumed=resumed or m.step_count > 0) for m in members]
        start_step = members[0].step_count
        t0 = time.perf_counter()
        base_elapsed = [m.elapsed_s for m in members]
        bar = tqdm(total=self.n_steps, initial=start_step, disable=not self.progress,
                   desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        first = members[0]
        try:
            while first.step_count < self.n_steps:
                try:
                    batch = stream.next_batch()
                except StopIteration:
                    exhausted = True
                    message = f"the stream ended after {first.step_count} of {self.n_steps} steps"
                    log.warning(message)
                    break
                try:
                    records = run_step(members, member_batches(batch, len(members)))
                except TrainingDiverged as exc:
                    status, message = "diverged", str(exc)
                    break
                bar.update(1)
                self._record(records, handles, base_elapsed, time.perf_counter() - t0)
                if "mse" in records[0]:
                    if on_log is not None:
                        on_log(records[0])
                    bar.set_postfix(first.postfix(records[0]), refresh=False)
                every = first.checkpoint_every
                if every and first.step_count % every == 0 and first.step_count < self.n_steps:
                    try:
                        self._checkpoint_all(stream)
                    except TrainingDiverged as exc:
                        status, message = "diverged", str(exc)
                        break
            wrote = first.step_count > start_step
            if status == "completed" and any(
                    m.checkpoint_dir is not None and (wrote or not ckpt.is_checkpoint(m.checkpoint_dir))
                    for m in members):
                try:
                    self._checkpoint_all(stream)
                except TrainingDiverged as exc:
                    status, message = "diverged", str(exc)
            if status == "diverged":
                folders = [str(m.checkpoint_dir) for m in members if m.checkpoint_dir is not None]
                log.error("%s; kept the last good checkpoint%s", message,
                          f" in {', '.join(folders)}" if folders else "")
                for m, fh in zip(members, handles):
                    m.write_line(fh, {"event": "diverged", "step": m.step_count + 1,
                                      "message": message, "elapsed": round(m.elapsed_s, 3)})
        finally:
            bar.close()
            for fh in handles:
                if fh is not None:
                    fh.close()
        return [self._result(m, status, message, exhausted) for m in members]

    def _record(self, records: list[dict[str, Any]], handles: list[IO[str] | None], base_elapsed: list[float],
                now: float) -> None:
        """Time-stamp, keep and write the log records of one step (log steps only)."""
        for m, fh, rec, base in zip(self.members, handles, records, base_elapsed):
            m.elapsed_s = base + now
            if "mse" in rec:
                rec["elapsed"] = round(m.elapsed_s, 3)
                rec["event"] = "train"
                m.metrics_history.append(rec)
                m.write_line(fh, rec)

    @staticmethod
    def _result(m: EngineMember, status: str, message: str, exhausted: bool) -> TrainResult:
        final: dict[str, Any] = next(
            (r for r in reversed(m.metrics_history) if r.get("event", "train") == "train"), {})
        return TrainResult(status=status, steps_done=m.step_count, tokens_seen=m.tokens_seen,
                           final_metrics=dict(final), message=message, elapsed_s=m.elapsed_s,
                           stream_exhausted=exhausted, checkpoint_dir=m.checkpoint_dir, log_path=m.log_path)
