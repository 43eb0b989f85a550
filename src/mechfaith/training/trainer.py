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

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from mechfaith.coders.coder import CoderOutput, SparseCoder
from mechfaith.coders.penalties import jacobian_contribution_penalty, sparsity_penalty
from mechfaith.errors import ConfigError, InputError
from mechfaith.training.config import TrainConfig
from mechfaith.training.dead_latents import auxk_loss
from mechfaith.training.engine import PendingStep, TrainResult
from mechfaith.training.jacobian_matching import global_probes, jacobian_matching
from mechfaith.training.module_trainer import ModuleTrainer
from mechfaith.training.optim import backward_step, set_lr, tokens_since_fired
from mechfaith.training.schedules import lr_at, sparsity_coef_at

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


class Trainer(ModuleTrainer):
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
                 progress: bool = True, desc: str = "train", name: str = "coder") -> None:
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
        self._setup(coder, cfg, log_path, checkpoint_dir, progress, desc, name, coder.n_latents)
        self.reference = reference
        self._n_dead: int | None = 0  # dead latents now (known without a sync); None = unknown
        self._unit = coder.cfg.decoder_norm == "unit"
        if self._unit:
            coder.normalize_decoder_()

    # ------------------------------------------------------------------------------------ one step
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

    def forget_dead_count(self) -> None:
        """The tracker changed outside a step (a restored checkpoint): count dead latents anew."""
        self._n_dead = None

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
            # under data parallelism, the global batch's probes (as one process draws them), this
            # rank's rows taken, so N ranks train the weights one process does
            v = None if self.sync is None else global_probes(x, cfg.n_probes, self.generator, self.sync.rank,
                                                             self.sync.world_size)
            jm = jacobian_matching(coder, self.reference, x, cfg.n_probes, self.generator, v=v)
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

    def begin_step(self, x: Tensor, y: Tensor | None, want_metrics: bool) -> PendingStep:
        """Forward and backward pass, gradient clipping and the values to synchronise (no update)."""
        cfg, coder = self.cfg, self.coder
        index = self.step_count
        batch_given = (x, y)
        x, y = self._prepare(x, y, f"batch of step {index + 1}")
        lr = lr_at(index, cfg)
        coef = sparsity_coef_at(index, cfg)
        set_lr(self.optimizer, lr)

        self.optimizer.zero_grad(set_to_none=True)
        terms = self.compute_losses(x, y, sparsity_coef=coef)
        grad_norm = backward_step(terms.total, self.params, cfg.grad_clip, self.sync,
                                  coder.remove_parallel_decoder_grad_ if self._unit else None)

        batch = x.shape[0]
        with torch.no_grad():
            # [n_latents]; rows: of this step over all processes
            new_since, rows = tokens_since_fired(self.tracker.tokens_since_fired, terms.out.mask.any(dim=0), batch,
                                                 self.sync)
            names = ["loss", "grad_norm", "n_dead"]
            values = [terms.total.detach(), grad_norm, (new_since >= cfg.dead_window).sum()]
            if want_metrics:
                names += ["recon", "mse", "fve", "l0", "dead_frac"]
                values += [terms.recon.detach(), terms.sse / terms.err.numel(),
                           1.0 - terms.sse / _total_var(terms.target),
                           terms.out.mask.sum(dtype=torch.float32) / batch,
                           (new_since >= cfg.dead_window).float().mean()]
                self.add_loss_terms(terms, ("sparsity", "jacobian", "jacobian_contribution", "auxk"), names, values)
            stacked = self.stack_values(values)
        return PendingStep(names, stacked, (new_since, rows, lr, coef), batch_given)

    def finish_step(self, pending: PendingStep, got: dict[str, Any]) -> dict[str, Any]:
        """Apply the update of a step begun by :meth:`begin_step` (its values read back in ``got``)."""
        new_since, rows, lr, coef = pending.state
        self.optimizer.step()
        if self._unit:
            self.coder.normalize_decoder_()
        self.tracker.tokens_since_fired = new_since
        got = dict(got)
        self._n_dead = int(got.pop("n_dead"))
        if self.sync is not None:
            self.sync.after_step(self.coder)
        return self.count_step(rows, lr, coef, got)


def _total_var(y: Tensor) -> Tensor:
    return (y - y.mean(dim=0, keepdim=True)).square().sum().clamp_min(torch.finfo(y.dtype).tiny)


def train(coder: SparseCoder, cfg: TrainConfig, stream: Any, *, reference: Reference | None = None,
          log_path: str | Path | None = None, checkpoint_dir: str | Path | None = None,
          resume: bool | str = False, progress: bool = True) -> TrainResult:
    """Build a :class:`Trainer` and :meth:`~Trainer.fit` ``stream`` (a one-call convenience)."""
    trainer = Trainer(coder, cfg, reference, log_path, checkpoint_dir, progress=progress)
    return trainer.fit(stream, resume=resume)
