"""The trainer: Adam on any stream of ``(x, y)`` batches, with an optional reference function.

Loss of one batch (x [B, d_in], target y [B, d_out]):

    recon                  = sum ||y_hat - y||^2 / B            (squared error summed over d_out)
    + lambda(step)         * sparsity penalty (none | l1 | tanh_l1 | l0, coders.penalties)
    + jacobian_coef        * E_v ||J_ref v - J_coder v||^2       (training.jacobian_matching)
    + jacobian_contribution_coef * sum_i 1[pre_i > 0] ||W_enc,i|| ||W_dec,i||
    + auxk_coef            * AuxK loss of the dead latents       (training.dead_latents)

The target is the stream's ``y``; when the stream yields ``y = None`` it is the reference's output
(the jvp's primal when Jacobian matching is on, so the reference runs once) or ``x`` for an SAE.

One step costs one host synchronisation (loss and gradient norm, checked for NaN/inf before Adam
updates anything); metrics (MSE, FVE, L0, dead fraction, each loss term) are computed only on log
steps and read in that same synchronisation. ``decoder_norm == 'unit'``: the gradient component
parallel to each decoder row is removed before the update and rows are renormalised after it.

The JSONL log has one object per whole line, flushed at once: on each log step (the first, every
``log_every``-th, the last) ``{"event": "train", "step", "tokens", "lr", "sparsity_coef", "loss",
"grad_norm", "recon", "mse", "fve", "l0", "dead_frac", "elapsed"}`` plus the active terms among
``"sparsity"``, ``"jacobian"``, ``"jacobian_rel"``, ``"jacobian_contribution"``, ``"auxk"`` (unweighted);
on divergence a last ``{"event": "diverged", "step", "message", "elapsed"}``. Metrics are those of
the log step's batch, before its update. A resumed run first cuts the log back to its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechfaith.atomic import write_text_atomic
from mechfaith.coders.coder import CoderOutput, SparseCoder
from mechfaith.coders.penalties import jacobian_contribution_penalty, sparsity_penalty
from mechfaith.configs import config_to_dict
from mechfaith.errors import CoderFileError, ConfigError, InputError, TrainingDiverged
from mechfaith.jsonio import json_safe
from mechfaith.training import checkpoint as ckpt
from mechfaith.training.config import TrainConfig
from mechfaith.training.dead_latents import DeadLatentTracker, auxk_loss
from mechfaith.training.jacobian_matching import jacobian_matching
from mechfaith.training.schedules import lr_at, sparsity_coef_at
from mechfaith.training.streams import BatchStream, as_stream

log = logging.getLogger(__name__)

Reference = Callable[[Tensor], Tensor]


@dataclass
class LossTerms:
    """The loss of one batch, term by term (tensors with their graph), and what it came from."""

    total: Tensor  # scalar
    recon: Tensor  # scalar, sum ||y_hat - y||^2 / B
    sse: Tensor  # scalar, sum ||y_hat - y||^2 (for the metrics)
    out: CoderOutput
    target: Tensor  # [B, d_out], no grad
    err: Tensor  # [B, d_out] y_hat - y
    sparsity: Tensor | None = None  # unweighted penalty
    jacobian: Tensor | None = None  # unweighted Jacobian-matching term
    jacobian_ref_sq: Tensor | None = None  # mean ||J_ref v||^2 (relative error = jacobian / this)
    jacobian_contribution: Tensor | None = None
    auxk: Tensor | None = None


@dataclass
class TrainResult:
    """How a :meth:`Trainer.fit` call ended."""

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


def _total_norm(grads: list[Tensor]) -> Tensor:
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0, foreach=True)
    norms = torch._foreach_norm(grads)  # older torch
    return torch.linalg.vector_norm(torch.stack(norms))


def _clip_(grads: list[Tensor], max_norm: float, total: Tensor) -> None:
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)


def _make_adam(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Adam:
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    # fused kernels exist for CUDA and (torch >= 2.4) CPU; fall back to the multi-tensor path
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


class Trainer:
    """Trains one :class:`SparseCoder` in place.

    ``reference``: the function the coder replaces (e.g. the real MLP), ``[B, d_in] -> [B, d_out]``;
    needed for Jacobian matching and for streams that yield no target. Never trained: it runs
    under ``no_grad`` and only the coder's parameters are in the optimiser.
    ``log_path``: a JSONL file, one object per log step. ``checkpoint_dir``: the checkpoint folder.
    ``progress``: show a tqdm bar (stderr) with rate and ETA. The coder moves to ``cfg.device`` and
    into training mode; with ``decoder_norm == 'unit'`` its decoder rows are normalised at once.
    """

    def __init__(self, coder: SparseCoder, cfg: TrainConfig, reference: Reference | None = None,
                 log_path: str | Path | None = None, checkpoint_dir: str | Path | None = None, *,
                 progress: bool = True, desc: str = "train") -> None:
        if not isinstance(coder, SparseCoder):
            raise ConfigError(f"Trainer: coder must be a SparseCoder, got {type(coder).__name__}")
        if not isinstance(cfg, TrainConfig):
            raise ConfigError(f"Trainer: cfg must be a TrainConfig, got {type(cfg).__name__}")
        if cfg.jacobian_coef > 0 and reference is None:
            raise ConfigError("Jacobian matching (jacobian_coef > 0) needs a reference function")
        if cfg.sparsity == "l0" and coder.cfg.activation != "jumprelu":
            raise ConfigError("the l0 penalty needs a JumpReLU coder (activation = 'jumprelu')")
        if reference is not None and not callable(reference):
            raise ConfigError("Trainer: reference must be callable")
        try:
            self.device = torch.device(cfg.device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as exc:
            raise ConfigError(f"TrainConfig.device {cfg.device!r} is not usable: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.cfg = cfg
        self.coder = coder.to(self.device)
        self.coder.train()
        self.reference = reference
        self.log_path = Path(log_path) if log_path is not None else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress
        self.desc = desc
        self.param_names: dict[str, torch.nn.Parameter] = {
            n: p for n, p in coder.named_parameters() if p.requires_grad}
        self.params = list(self.param_names.values())
        self.optimizer = _make_adam(self.params, cfg)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.tracker = DeadLatentTracker(coder.n_latents, self.device)
        self.step_count = 0  # optimiser steps done
        self.tokens_seen = 0  # rows trained on
        self.elapsed_s = 0.0  # training time of earlier fit() calls and resumed runs
        self.metrics_history: list[dict[str, Any]] = []
        self.pending_stream_state: dict[str, Any] | None = None  # from a checkpoint, for fit()
        self._n_dead: int | None = 0  # dead latents now (known without a sync); None = unknown
        self._unit = coder.cfg.decoder_norm == "unit"
        # data-parallel hook (set by mechfaith.training.distributed.attach): averages gradients,
        # fired latents and metrics over processes; None for one process
        self.sync: Any = None
        if self._unit:
            coder.normalize_decoder_()

    # ------------------------------------------------------------------------------------ one step
    def is_log_step(self, index: int) -> bool:
        """Whether step ``index`` (0-based) computes metrics: the first, every log_every-th, the last."""
        done = index + 1
        return index == 0 or done % self.cfg.log_every == 0 or done == self.cfg.n_steps

    def _prepare(self, x: Tensor, y: Tensor | None, where: str) -> tuple[Tensor, Tensor | None]:
        coder = self.coder
        if not isinstance(x, Tensor):
            raise InputError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{where}: x must be a floating-point tensor, got {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != coder.d_in:
            raise InputError(f"{where}: x has shape {tuple(x.shape)}; expected [batch, {coder.d_in}] (d_in)")
        x = x.reshape(-1, coder.d_in)
        if x.shape[0] == 0:
            raise InputError(f"{where}: the batch is empty")
        dtype = coder.W_enc.dtype
        x = x.detach().to(self.device, dtype, non_blocking=True)
        if y is not None:
            if not isinstance(y, Tensor):
                raise InputError(f"{where}: y must be a torch.Tensor or None, got {type(y).__name__}")
            if not y.is_floating_point():
                raise InputError(f"{where}: y must be a floating-point tensor, got {y.dtype}")
            if y.ndim < 1 or y.shape[-1] != coder.d_out or y.numel() != x.shape[0] * coder.d_out:
                raise InputError(f"{where}: y has shape {tuple(y.shape)}; expected "
                                 f"[{x.shape[0]}, {coder.d_out}] (batch, d_out)")
            y = y.detach().reshape(-1, coder.d_out).to(self.device, dtype, non_blocking=True)
        elif coder.cfg.kind != "sae" and self.reference is None:
            raise InputError(f"{where}: the batch has no target y and the trainer has no reference "
                             f"function to compute it")
        return x, y

    def _reference_target(self, x: Tensor) -> Tensor:
        assert self.reference is not None
        with torch.no_grad():
            y = self.reference(x)
        return self._check_reference_output(y, x)

    def _check_reference_output(self, y: Any, x: Tensor) -> Tensor:
        if not isinstance(y, Tensor) or y.shape != (x.shape[0], self.coder.d_out):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise InputError(f"the reference returned {shape}; expected [{x.shape[0]}, {self.coder.d_out}]")
        return y.detach().to(self.coder.W_enc.dtype)

    def _dead_count(self) -> int:
        if self._n_dead is None:
            self._n_dead = int(self.tracker.dead_mask(self.cfg.dead_window).sum())
        return self._n_dead

    def compute_losses(self, x: Tensor, y: Tensor | None = None, *,
                       sparsity_coef: float | None = None) -> LossTerms:
        """Every loss term of the batch x [B, d_in] (on the trainer's device) and target y or None.

        ``sparsity_coef`` defaults to the schedule's value at the current step.
        """
        cfg, coder = self.cfg, self.coder
        coef = sparsity_coef_at(self.step_count, cfg) if sparsity_coef is None else sparsity_coef
        jm = None
        if cfg.jacobian_coef > 0:
            assert self.reference is not None
            jm = jacobian_matching(coder, self.reference, x, cfg.n_probes, self.generator)
            out = jm.out  # one forward pass serves both terms
            if y is None:
                y = x if coder.cfg.kind == "sae" else self._check_reference_output(jm.ref_y, x)
        else:
            out = coder.forward_full(x)
            if y is None:
                y = x if coder.cfg.kind == "sae" else self._reference_target(x)
        batch = x.shape[0]
        err = out.y_hat - y  # [B, d_out]
        sse = err.square().sum()
        recon = sse / batch
        terms = LossTerms(total=recon, recon=recon, sse=sse, out=out, target=y, err=err)
        total = recon
        if cfg.sparsity != "none" and cfg.sparsity_coef > 0:
            terms.sparsity = sparsity_penalty(cfg.sparsity, coder, out, cfg.tanh_scale)
            total = total + coef * terms.sparsity
        if jm is not None:
            terms.jacobian = jm.loss
            terms.jacobian_ref_sq = jm.ref_jv_sq
            total = total + cfg.jacobian_coef * jm.loss
        if cfg.jacobian_contribution_coef > 0:
            terms.jacobian_contribution = jacobian_contribution_penalty(coder, out)
            total = total + cfg.jacobian_contribution_coef * terms.jacobian_contribution
        if cfg.auxk_coef > 0:
            n_dead = self._dead_count()
            if n_dead > 0:
                dead = self.tracker.dead_mask(cfg.dead_window)
                terms.auxk = auxk_loss(out.pre, -err.detach(), coder.W_dec, dead, min(cfg.auxk_k, n_dead))
                total = total + cfg.auxk_coef * terms.auxk
        terms.total = total
        return terms

    def step(self, x: Tensor, y: Tensor | None = None, *, metrics: bool | None = None) -> dict[str, Any]:
        """One optimiser step on the batch ``(x, y)``; ``y = None``: the reference's output (or x).

        Returns ``step`` (steps done), ``tokens``, ``lr``, ``sparsity_coef``, ``loss``, ``grad_norm``
        and, on log steps (or when ``metrics`` is True), ``recon``, each other loss term, ``mse``,
        ``fve``, ``l0``, ``dead_frac`` (and ``jacobian_rel`` with Jacobian matching).
        Raises :class:`InputError` for a bad batch and :class:`TrainingDiverged` when the loss or
        a gradient is NaN/inf; in both cases nothing (weights, Adam, counters) has changed.
        """
        cfg, coder = self.cfg, self.coder
        index = self.step_count
        where = f"batch of step {index + 1}"
        y_given = y
        x, y = self._prepare(x, y, where)
        want_metrics = self.is_log_step(index) if metrics is None else metrics
        lr = lr_at(index, cfg)
        coef = sparsity_coef_at(index, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        self.optimizer.zero_grad(set_to_none=True)
        terms = self.compute_losses(x, y, sparsity_coef=coef)
        terms.total.backward()
        if self.sync is not None:
            self.sync.reduce_grads(self.params)
        if self._unit:
            coder.remove_parallel_decoder_grad_()
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = _total_norm(grads)
        if cfg.grad_clip > 0:
            _clip_(grads, cfg.grad_clip, grad_norm)

        batch = x.shape[0]
        with torch.no_grad():
            fired = terms.out.mask.any(dim=0)  # [n_latents]
            rows = batch  # rows of this step over all processes
            if self.sync is not None:
                fired = self.sync.reduce_fired(fired)
                rows = self.sync.global_rows(batch)
            since = self.tracker.tokens_since_fired
            new_since = torch.where(fired, torch.zeros_like(since), since + rows)
            names = ["loss", "grad_norm", "n_dead"]
            values = [terms.total.detach(), grad_norm, (new_since >= cfg.dead_window).sum()]
            if want_metrics:
                names += ["recon", "mse", "fve", "l0", "dead_frac"]
                values += [terms.recon.detach(), terms.sse / terms.err.numel(),
                           1.0 - terms.sse / _total_var(terms.target),
                           terms.out.mask.sum(dtype=torch.float32) / batch,
                           (new_since >= cfg.dead_window).float().mean()]
                for name in ("sparsity", "jacobian", "jacobian_contribution", "auxk"):
                    value = getattr(terms, name)
                    if value is not None:
                        names.append(name)
                        values.append(value.detach())
                if terms.jacobian is not None and terms.jacobian_ref_sq is not None:
                    names.append("jacobian_rel")
                    values.append(terms.jacobian.detach() / terms.jacobian_ref_sq.clamp_min(1e-30))
            stacked = torch.stack([v.to(torch.float64) for v in values])
            if self.sync is not None:
                stacked = self.sync.reduce_values(stacked)  # means over processes
            synced = stacked.tolist()  # the one host sync
        got = dict(zip(names, synced))
        if not (math.isfinite(got["loss"]) and math.isfinite(got["grad_norm"])):
            self.optimizer.zero_grad(set_to_none=True)
            self._raise_nonfinite(index, x, y_given, got["loss"], got["grad_norm"])

        self.optimizer.step()
        if self._unit:
            coder.normalize_decoder_()
        self.tracker.tokens_since_fired = new_since
        self._n_dead = int(got.pop("n_dead"))
        if self.sync is not None:
            self.sync.after_step(coder)
        self.step_count += 1
        self.tokens_seen += rows
        record: dict[str, Any] = {"step": self.step_count, "tokens": self.tokens_seen, "lr": lr,
                                  "sparsity_coef": coef}
        record.update(got)
        return record

    def _raise_nonfinite(self, index: int, x: Tensor, y_given: Tensor | None, loss: float,
                         grad_norm: float) -> None:
        where = f"batch of step {index + 1}"
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"the {where} holds NaN or inf in x")
        if y_given is not None and not bool(torch.isfinite(y_given).all()):
            raise InputError(f"the {where} holds NaN or inf in y")
        raise TrainingDiverged(f"training diverged at step {index + 1}: loss {loss}, gradient norm "
                               f"{grad_norm}; no update was made")

    # ------------------------------------------------------------------------------------ checkpoints
    def params_finite(self) -> bool:
        """Whether every parameter of the coder is finite (one host sync)."""
        flags = torch.stack([torch.isfinite(p).all() for p in self.coder.parameters()])
        return bool(flags.all())

    def save_checkpoint(self, stream: BatchStream | None = None, folder: str | Path | None = None,
                        elapsed_s: float | None = None) -> Path:
        """Write a checkpoint (default folder: ``checkpoint_dir``); refuses non-finite weights."""
        folder = Path(folder) if folder is not None else self.checkpoint_dir
        if folder is None:
            raise ConfigError("no checkpoint folder given")
        if not self.params_finite():
            raise TrainingDiverged(f"the coder's weights are not finite at step {self.step_count}; "
                                   f"the checkpoint was not written")
        tensors = {"dead.tokens_since_fired": self.tracker.tokens_since_fired,
                   "rng.probes": self.generator.get_state(),
                   "rng.torch_cpu": torch.get_rng_state()}
        return ckpt.save_checkpoint(
            folder, coder=self.coder, train_config=self.cfg, step=self.step_count,
            tokens=self.tokens_seen,
            optimizer_state=ckpt.flatten_adam_state(self.optimizer, self.param_names),
            tensors=tensors, stream_state=stream.state_dict() if stream is not None else None,
            metrics=self.metrics_history,
            elapsed_s=self.elapsed_s if elapsed_s is None else elapsed_s)

    def load_checkpoint(self, folder: str | Path | None = None,
                        stream: BatchStream | None = None) -> ckpt.Checkpoint:
        """Restore weights, Adam, counters, dead-latent tracker and RNGs from a checkpoint.

        The stream's saved position goes into ``stream`` when given, else into
        ``pending_stream_state`` (which :meth:`fit` applies to its stream).
        """
        folder = Path(folder) if folder is not None else self.checkpoint_dir
        if folder is None:
            raise ConfigError("no checkpoint folder given")
        c = ckpt.load_checkpoint(folder)
        if c.coder.cfg != self.coder.cfg:
            raise ConfigError(f"the checkpoint in {c.folder} holds a coder with another "
                              f"configuration ({config_to_dict(c.coder.cfg)}) than the one being "
                              f"trained ({config_to_dict(self.coder.cfg)})")
        old, new = config_to_dict(c.train_config), config_to_dict(self.cfg)
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            log.warning("resuming with changed training options: %s",
                        ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed))
        where = c.folder / ckpt.TENSORS_NAME
        for key in ("dead.tokens_since_fired", "rng.probes"):
            if key not in c.tensors:
                raise CoderFileError(where, f"missing tensor {key!r}")
        since = c.tensors["dead.tokens_since_fired"]
        if since.shape != (self.coder.n_latents,):
            raise CoderFileError(where, f"dead.tokens_since_fired has shape {tuple(since.shape)}")
        with torch.no_grad():
            self.coder.load_state_dict(c.coder.state_dict())
        ckpt.restore_adam_state(self.optimizer, self.param_names, c.optimizer_state,
                                c.folder / ckpt.OPTIMIZER_NAME)
        self.tracker.tokens_since_fired = since.to(self.device, torch.int64).clone()
        try:
            self.generator.set_state(c.tensors["rng.probes"])
            if "rng.torch_cpu" in c.tensors:
                torch.set_rng_state(c.tensors["rng.torch_cpu"])
        except (RuntimeError, TypeError) as exc:
            raise CoderFileError(where, f"bad random-generator state ({exc})") from None
        self.step_count, self.tokens_seen = c.step, c.tokens
        self.elapsed_s = c.elapsed_s
        self.metrics_history = list(c.metrics)
        self._n_dead = None
        if stream is not None and c.stream_state is not None:
            stream.load_state_dict(c.stream_state)
            self.pending_stream_state = None
        else:
            self.pending_stream_state = c.stream_state
        return c

    # ------------------------------------------------------------------------------------ the loop
    def _open_log(self, resumed: bool):
        if self.log_path is None:
            return None
        kept: list[str] = []
        if resumed and self.log_path.is_file():
            for line in self.log_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line (cannot happen with whole-line writes, but be safe)
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= self.step_count:
                    kept.append(line)
        # keep only what the checkpoint has seen, so a resumed run's log has each step once
        write_text_atomic(self.log_path, "".join(line + "\n" for line in kept))
        return open(self.log_path, "a", encoding="utf-8")

    @staticmethod
    def _write_line(fh, record: dict[str, Any]) -> None:
        if fh is None:
            return
        fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # one whole line
        fh.flush()

    def fit(self, stream: Any, *, resume: bool | str = False,
            on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Train until ``n_steps`` steps are done, the stream ends, or the loss diverges.

        ``stream``: a :class:`BatchStream` or any iterable of ``(x, y)`` batches.
        ``resume``: continue from the checkpoint in ``checkpoint_dir`` (weights, Adam, RNGs, the
        stream's position), so the result equals an uninterrupted run's; ``"auto"``: resume when
        ``checkpoint_dir`` holds a checkpoint, else start afresh. An interrupted run
        (exception, Ctrl-C) writes no checkpoint beyond its last periodic one.
        ``on_log``: called with each log record (after it is written), e.g. for a held-out
        evaluation; it must not change the coder.
        """
        cfg = self.cfg
        stream = as_stream(stream)
        if resume == "auto":
            resume = self.checkpoint_dir is not None and ckpt.is_checkpoint(self.checkpoint_dir)
        elif not isinstance(resume, bool):
            raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
        if resume:
            if self.checkpoint_dir is None:
                raise ConfigError("resume needs a checkpoint folder")
            self.load_checkpoint(self.checkpoint_dir, stream)
        elif self.pending_stream_state is not None:
            stream.load_state_dict(self.pending_stream_state)
            self.pending_stream_state = None
        status, message, exhausted = "completed", "", False
        fh = self._open_log(resumed=resume or self.step_count > 0)
        start_step = self.step_count
        t0 = time.perf_counter()
        base_elapsed = self.elapsed_s
        bar = tqdm(total=cfg.n_steps, initial=self.step_count, disable=not self.progress,
                   desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        try:
            while self.step_count < cfg.n_steps:
                try:
                    x, y = stream.next_batch()
                except StopIteration:
                    exhausted = True
                    message = f"the stream ended after {self.step_count} of {cfg.n_steps} steps"
                    log.warning(message)
                    break
                try:
                    record = self.step(x, y)
                except TrainingDiverged as exc:
                    status, message = "diverged", str(exc)
                    break
                bar.update(1)
                self.elapsed_s = base_elapsed + time.perf_counter() - t0
                if "mse" in record:
                    record["elapsed"] = round(self.elapsed_s, 3)
                    record["event"] = "train"
                    self.metrics_history.append(record)
                    self._write_line(fh, record)
                    if on_log is not None:
                        on_log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", fve=f"{record['fve']:.3f}",
                                    l0=f"{record['l0']:.1f}", dead=f"{record['dead_frac']:.2f}",
                                    refresh=False)
                if (self.checkpoint_dir is not None and cfg.checkpoint_every
                        and self.step_count % cfg.checkpoint_every == 0 and self.step_count < cfg.n_steps):
                    try:
                        self.save_checkpoint(stream)
                    except TrainingDiverged as exc:
                        status, message = "diverged", str(exc)
                        break
            if (status == "completed" and self.checkpoint_dir is not None
                    and (self.step_count > start_step or not ckpt.is_checkpoint(self.checkpoint_dir))):
                try:
                    self.save_checkpoint(stream)
                except TrainingDiverged as exc:
                    status, message = "diverged", str(exc)
            if status == "diverged":
                log.error("%s; kept the last good checkpoint%s", message,
                          f" in {self.checkpoint_dir}" if self.checkpoint_dir else "")
                self._write_line(fh, {"event": "diverged", "step": self.step_count + 1,
                                      "message": message, "elapsed": round(self.elapsed_s, 3)})
        finally:
            bar.close()
            if fh is not None:
                fh.close()
        final = next((r for r in reversed(self.metrics_history) if r.get("event", "train") == "train"), {})
        return TrainResult(status=status, steps_done=self.step_count, tokens_seen=self.tokens_seen,
                           final_metrics=dict(final), message=message, elapsed_s=self.elapsed_s,
                           stream_exhausted=exhausted, checkpoint_dir=self.checkpoint_dir,
                           log_path=self.log_path)


def _total_var(y: Tensor) -> Tensor:
    return (y - y.mean(dim=0, keepdim=True)).square().sum().clamp_min(torch.finfo(y.dtype).tiny)


def train(coder: SparseCoder, cfg: TrainConfig, stream: Any, *, reference: Reference | None = None,
          log_path: str | Path | None = None, checkpoint_dir: str | Path | None = None,
          resume: bool | str = False, progress: bool = True) -> TrainResult:
    """Build a :class:`Trainer` and :meth:`~Trainer.fit` ``stream`` (a one-call convenience)."""
    trainer = Trainer(coder, cfg, reference, log_path, checkpoint_dir, progress=progress)
    return trainer.fit(stream, resume=resume)
