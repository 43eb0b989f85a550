"""What :class:`~mechfaith.training.trainer.Trainer` and :class:`~mechfaith.training.clt_trainer.CLTTrainer`
share: one module trained by one :class:`TrainConfig` (its device checked, Adam over the module's
trainable parameters, the probe generator, the dead-latent tracker, the counters), the config's
step counts, and checkpoints with exact resume (:mod:`mechfaith.training.trainer_state`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechfaith.errors import ConfigError
from mechfaith.training import checkpoint as ckpt
from mechfaith.training.config import TrainConfig
from mechfaith.training.dead_latents import DeadLatentTracker
from mechfaith.training.engine import EngineMember
from mechfaith.training.optim import make_adam
from mechfaith.training.streams import BatchStream
from mechfaith.training.trainer_state import load_trainer_state, params_finite, save_trainer_state


def usable_device(name: str) -> torch.device:
    """``torch.device(name)`` if a tensor can be made there, else a :class:`ConfigError` in one line."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"TrainConfig.device {name!r} is not usable: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return device


class ModuleTrainer(EngineMember):
    """The shared set-up and checkpoints of a trainer of one module (see the module docstring)."""

    cfg: TrainConfig
    coder: Any  # the trained module (a SparseCoder or a CrossLayerTranscoder)

    def _setup(self, module: nn.Module, cfg: TrainConfig, log_path: str | Path | None,
               checkpoint_dir: str | Path | None, progress: bool, desc: str, name: str, n_tracked: int) -> None:
        """Move ``module`` to the config's device in training mode and build everything around it;
        ``n_tracked``: latents the dead-latent tracker counts."""
        self.device = usable_device(cfg.device)
        self.cfg = cfg
        self.coder = module.to(self.device)
        self.coder.train()
        self.log_path = Path(log_path) if log_path is not None else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress, self.desc, self.name = progress, desc, name
        self.param_names: dict[str, nn.Parameter] = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.params = list(self.param_names.values())
        self.optimizer = make_adam(self.params, cfg, thresholds=[p for n, p in self.param_names.items()
                                                                 if n == "log_threshold"])
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.tracker = DeadLatentTracker(n_tracked, self.device)
        self.step_count = 0  # optimiser steps done
        self.tokens_seen = 0  # rows trained on
        self.elapsed_s = 0.0  # training time of earlier fit() calls and resumed runs
        self.metrics_history: list[dict[str, Any]] = []
        self.pending_stream_state: dict[str, Any] | None = None  # from a checkpoint, for fit()
        # data-parallel hook (set by mechfaith.training.distributed.attach): averages gradients,
        # fired latents and metrics over processes; None for one process
        self.sync: Any = None

    @property
    def n_steps(self) -> int:  # type: ignore[override]
        return self.cfg.n_steps

    @property
    def log_every(self) -> int:  # type: ignore[override]
        return self.cfg.log_every

    @property
    def checkpoint_every(self) -> int:  # type: ignore[override]
        return self.cfg.checkpoint_every

    def abort_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4g}", "fve": f"{record['fve']:.3f}",
                "l0": f"{record['l0']:.1f}", "dead": f"{record['dead_frac']:.2f}"}

    @staticmethod
    def add_loss_terms(terms: Any, optional: tuple[str, ...], names: list[str], values: list[Any]) -> None:
        """Append each of the ``optional`` loss terms ``terms`` holds, and ``jacobian_rel`` (the
        Jacobian term over the reference's squared JVP) when it has the Jacobian term."""
        for name in optional:
            value = getattr(terms, name)
            if value is not None:
                names.append(name)
                values.append(value.detach())
        if terms.jacobian is not None and terms.jacobian_ref_sq is not None:
            names.append("jacobian_rel")
            values.append(terms.jacobian.detach() / terms.jacobian_ref_sq.clamp_min(1e-30))

    def stack_values(self, values: list[Any]) -> torch.Tensor:
        """A step's values as one float64 vector (one host sync reads it), means over processes."""
        stacked = torch.stack([v.to(torch.float64) for v in values])
        return self.sync.reduce_values(stacked) if self.sync is not None else stacked

    def count_step(self, rows: int, lr: float, coef: float, got: dict[str, Any]) -> dict[str, Any]:
        """Count a finished step of ``rows`` rows; its log record (counters, lr, coefficient, ``got``)."""
        self.step_count += 1
        self.tokens_seen += rows
        record: dict[str, Any] = {"step": self.step_count, "tokens": self.tokens_seen, "lr": lr,
                                  "sparsity_coef": coef}
        record.update(got)
        return record

    def forget_dead_count(self) -> None:
        """The tracker changed outside a step (a restored checkpoint): drop what was derived from it."""

    def params_finite(self) -> bool:
        """Whether every parameter of the module is finite (one host sync)."""
        return params_finite(self)

    def save_checkpoint(self, stream: BatchStream | None = None, folder: str | Path | None = None,
                        elapsed_s: float | None = None) -> Path:
        """Write a checkpoint (default folder: ``checkpoint_dir``); refuses non-finite weights."""
        return save_trainer_state(self, stream, folder, elapsed_s)

    def load_checkpoint(self, folder: str | Path | None = None,
                        stream: BatchStream | None = None) -> ckpt.Checkpoint:
        """Restore weights, Adam, counters, dead-latent tracker and RNGs from a checkpoint.

        The stream's saved position goes into ``stream`` when given, else into
        ``pending_stream_state`` (which :meth:`fit` applies to its stream).
        """
        return load_trainer_state(self, folder, stream)
