"""The CLT trainer: one :class:`~mechfaith.coders.clt.CrossLayerTranscoder` as a member of the engine.

Batches are layer-major: ``x`` [L, B, d_in] (each block layer's MLP input at the same B tokens) and
``y`` [L, B, d_out] (each layer's MLP output) or None (then ``references[t](x[t])``). The loss is
:func:`~mechfaith.training.clt_losses.clt_losses`: reconstruction summed over layers, the sparsity
penalty of the TrainConfig (``l0`` for JumpReLU, ``tanh_l1`` / ``l1`` weighting each latent by its
decoder norm summed over target layers, ``none`` for TopK) on its schedule, and Jacobian matching
of each layer's local Jacobian (``jacobian_coef``; needs ``references``, the real MLPs).

Everything else is the :class:`~mechfaith.training.trainer.Trainer`'s: Adam with the same
schedules, gradient clipping, one host synchronisation per step with the NaN/inf guard, dead-latent
tracking (per layer and latent; a dead latent has not fired on ``dead_window`` tokens), JSONL logs,
checkpoints with exact resume (:mod:`mechfaith.training.trainer_state`; the CLT is saved by
:mod:`mechfaith.coders.clt_files`), and data-parallel training under torchrun
(:func:`mechfaith.training.distributed.attach` works on this trainer; shard batches along their
row dimension 1). Not here: AuxK (TopK CLTs report their dead fraction; resample by restarting
dead latents yourself) and unit-norm decoders (the decoder norm enters the penalties instead).

Log records: ``step``, ``tokens``, ``lr``, ``sparsity_coef``, ``loss``, ``grad_norm`` and on log steps
``recon``, ``mse``, ``fve`` (over all layers), ``l0`` (active latents per token and layer),
``l0_token`` (per token, all layers), ``dead_frac``, and the active terms among ``sparsity``,
``jacobian``, ``jacobian_rel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.errors import ConfigError, InputError
from mechfaith.training.clt_losses import CLTTerms, Reference, clt_losses
from mechfaith.training.config import TrainConfig
from mechfaith.training.engine import PendingStep
from mechfaith.training.jacobian_matching import global_probes
from mechfaith.training.module_trainer import ModuleTrainer
from mechfaith.training.optim import backward_step, set_lr, tokens_since_fired
from mechfaith.training.schedules import lr_at, sparsity_coef_at


class CLTTrainer(ModuleTrainer):
    """Trains one :class:`CrossLayerTranscoder` in place (see the module docstring)."""

    def __init__(self, clt: CrossLayerTranscoder, cfg: TrainConfig,
                 references: Sequence[Reference] | None = None, log_path: str | Path | None = None,
                 checkpoint_dir: str | Path | None = None, *, progress: bool = True, desc: str = "train clt",
                 name: str = "clt") -> None:
        if not isinstance(clt, CrossLayerTranscoder):
            raise ConfigError(f"CLTTrainer: expected a CrossLayerTranscoder, got {type(clt).__name__}")
        if cfg.jacobian_coef > 0 and references is None:
            raise ConfigError("Jacobian matching (jacobian_coef > 0) needs one reference MLP per layer")
        if references is not None and (len(references) != clt.n_layers or not all(callable(r) for r in references)):
            raise ConfigError(f"CLTTrainer: references must be {clt.n_layers} functions (one per layer)")
        if cfg.sparsity == "l0" and clt.cfg.activation != "jumprelu":
            raise ConfigError("the l0 penalty needs a JumpReLU CLT (activation = 'jumprelu')")
        self._setup(clt, cfg, log_path, checkpoint_dir, progress, desc, name, clt.n_layers * clt.n_latents)
        self.references = list(references) if references is not None else None

    # ------------------------------------------------------------------------------------ one step
    def _prepare(self, x: Any, y: Any, where: str) -> tuple[Tensor, Tensor | None]:
        clt = self.coder
        L, d_in, d_out = clt.n_layers, clt.d_in, clt.d_out
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 3 or x.shape[0] != L \
                or x.shape[2] != d_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(f"{where}: x has shape {shape}; expected a float tensor [{L}, batch, {d_in}] "
                             f"(layers, tokens, d_in)")
        if x.shape[1] == 0:
            raise InputError(f"{where}: the batch is empty")
        dtype = clt.W_enc.dtype
        x = x.detach().to(self.device, dtype)
        if y is not None:
            if not isinstance(y, Tensor) or not y.is_floating_point() or tuple(y.shape) != (L, x.shape[1], d_out):
                shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                raise InputError(f"{where}: y has shape {shape}; expected a float tensor "
                                 f"[{L}, {x.shape[1]}, {d_out}]")
            y = y.detach().to(self.device, dtype)
        elif self.references is None:
            raise InputError(f"{where}: the batch has no target y and the trainer has no reference MLPs")
        return x, y

    def compute_losses(self, x: Tensor, y: Tensor | None = None, *, sparsity_coef: float | None = None) -> CLTTerms:
        """Every loss term of the batch (x on the trainer's device)."""
        cfg = self.cfg
        coef = sparsity_coef_at(self.step_count, cfg) if sparsity_coef is None else sparsity_coef
        v = None
        if cfg.jacobian_coef > 0:
            # probes of the global batch, this rank's rows taken: data-parallel ranks see the probes
            # one process would (the same weights, not merely a valid estimate)
            rank, world = (self.sync.rank, self.sync.world_size) if self.sync is not None else (0, 1)
            v = global_probes(x, cfg.n_probes, self.generator, rank, world, row_dim=1)
        return clt_losses(self.coder, x, y, sparsity=cfg.sparsity, sparsity_coef=coef, tanh_scale=cfg.tanh_scale,
                          jacobian_coef=cfg.jacobian_coef, references=self.references, v=v)

    def begin_step(self, x: Tensor, y: Tensor | None, want_metrics: bool) -> PendingStep:
        cfg = self.cfg
        index = self.step_count
        given = (x, y)
        x, y = self._prepare(x, y, f"batch of step {index + 1}")
        lr = lr_at(index, cfg)
        coef = sparsity_coef_at(index, cfg)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.compute_losses(x, y, sparsity_coef=coef)
        grad_norm = backward_step(terms.total, self.params, cfg.grad_clip, self.sync)
        B = x.shape[1]
        with torch.no_grad():
            new_since, rows = tokens_since_fired(self.tracker.tokens_since_fired,
                                                 terms.out.mask.any(dim=1).reshape(-1), B, self.sync)  # [L * n]
            names = ["loss", "grad_norm"]
            values = [terms.total.detach(), grad_norm]
            if want_metrics:
                t = terms.target
                var = (t - t.mean(dim=1, keepdim=True)).square().sum().clamp_min(torch.finfo(t.dtype).tiny)
                active = terms.out.mask.sum(dtype=torch.float64)
                names += ["recon", "mse", "fve", "l0", "l0_token", "dead_frac"]
                values += [terms.recon.detach(), terms.sse.detach() / t.numel(), 1.0 - terms.sse.detach() / var,
                           active / (B * x.shape[0]), active / B,
                           (new_since >= cfg.dead_window).to(torch.float64).mean()]
                self.add_loss_terms(terms, ("sparsity", "jacobian"), names, values)
            stacked = self.stack_values(values)
        return PendingStep(names, stacked, (new_since, rows, lr, coef), given)

    def finish_step(self, pending: PendingStep, got: dict[str, Any]) -> dict[str, Any]:
        new_since, rows, lr, coef = pending.state
        self.optimizer.step()
        self.tracker.tokens_since_fired = new_since
        return self.count_step(rows, lr, coef, got)


def train_clt(clt: CrossLayerTranscoder, cfg: TrainConfig, stream: Any, *,
              references: Sequence[Reference] | None = None, log_path: str | Path | None = None,
              checkpoint_dir: str | Path | None = None, resume: bool | str = False, progress: bool = True) -> Any:
    """Build a :class:`CLTTrainer` and fit ``stream`` (a one-call convenience); returns the TrainResult."""
    trainer = CLTTrainer(clt, cfg, references, log_path, checkpoint_dir, progress=progress)
    return trainer.fit(stream, resume=resume)
