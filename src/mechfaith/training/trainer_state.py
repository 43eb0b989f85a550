"""Saving and restoring a :class:`~mechfaith.training.trainer.Trainer`'s whole state as a checkpoint.

A checkpoint (``training.checkpoint``) holds the coder, the Adam state, the step and token
counters, the dead-latent tracker, the random generators (probes and torch's CPU generator), the
stream's position, the metrics so far and the elapsed time; resuming from it gives the weights an
uninterrupted run would have given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mechfaith.atomic import clean_stale_temps
from mechfaith.configs import config_to_dict
from mechfaith.errors import CoderFileError, ConfigError, TrainingDiverged
from mechfaith.training import checkpoint as ckpt
from mechfaith.training.streams import BatchStream

if TYPE_CHECKING:
    from mechfaith.training.module_trainer import ModuleTrainer

log = logging.getLogger(__name__)


def params_finite(trainer: "ModuleTrainer") -> bool:
    """Whether every parameter of the coder is finite (one host sync)."""
    flags = torch.stack([torch.isfinite(p).all() for p in trainer.coder.parameters()])
    return bool(flags.all())


def save_trainer_state(trainer: "ModuleTrainer", stream: BatchStream | None = None, folder: str | Path | None = None,
                       elapsed_s: float | None = None) -> Path:
    """Write a checkpoint (default folder: the trainer's ``checkpoint_dir``); refuses non-finite weights."""
    folder = Path(folder) if folder is not None else trainer.checkpoint_dir
    if folder is None:
        raise ConfigError("no checkpoint folder given")
    if not params_finite(trainer):
        raise TrainingDiverged(f"the coder's weights are not finite at step {trainer.step_count}; "
                               f"the checkpoint was not written")
    tensors = {"dead.tokens_since_fired": trainer.tracker.tokens_since_fired,
               "rng.probes": trainer.generator.get_state(),
               "rng.torch_cpu": torch.get_rng_state()}
    return ckpt.save_checkpoint(
        folder, coder=trainer.coder, train_config=trainer.cfg, step=trainer.step_count,
        tokens=trainer.tokens_seen,
        optimizer_state=ckpt.flatten_adam_state(trainer.optimizer, trainer.param_names),
        tensors=tensors, stream_state=stream.state_dict() if stream is not None else None,
        metrics=trainer.metrics_history,
        elapsed_s=trainer.elapsed_s if elapsed_s is None else elapsed_s)


def load_trainer_state(trainer: "ModuleTrainer", folder: str | Path | None = None,
                       stream: BatchStream | None = None) -> ckpt.Checkpoint:
    """Restore weights, Adam, counters, dead-latent tracker and RNGs (see :meth:`Trainer.load_checkpoint`)."""
    folder = Path(folder) if folder is not None else trainer.checkpoint_dir
    if folder is None:
        raise ConfigError("no checkpoint folder given")
    clean_stale_temps(folder)  # what an interrupted checkpoint write left beside it
    c = ckpt.load_checkpoint(folder)
    if c.step > trainer.n_steps:
        raise ConfigError(f"the checkpoint in {c.folder} is at step {c.step}, beyond this run's n_steps "
                          f"{trainer.n_steps}: resume with n_steps >= {c.step}, or start afresh")
    if c.coder.cfg != trainer.coder.cfg:
        raise ConfigError(f"the checkpoint in {c.folder} holds a coder with another "
                          f"configuration ({config_to_dict(c.coder.cfg)}) than the one being "
                          f"trained ({config_to_dict(trainer.coder.cfg)})")
    old, new = config_to_dict(c.train_config), config_to_dict(trainer.cfg)
    changed = sorted(k for k in new if old.get(k) != new[k])
    if changed:
        log.warning("resuming with changed training options: %s",
                    ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed))
    where = c.folder / ckpt.TENSORS_NAME
    for key in ("dead.tokens_since_fired", "rng.probes"):
        if key not in c.tensors:
            raise CoderFileError(where, f"missing tensor {key!r}")
    since = c.tensors["dead.tokens_since_fired"]
    n_tracked = trainer.tracker.tokens_since_fired.numel()  # latents (a CLT: layers x latents)
    if since.shape != (n_tracked,) or since.is_floating_point() or since.dtype == torch.bool \
            or (since.numel() and int(since.min()) < 0):
        raise CoderFileError(where, f"dead.tokens_since_fired must be {n_tracked} integers >= 0, "
                                    f"got {str(since.dtype).replace('torch.', '')} {tuple(since.shape)}")
    with torch.no_grad():
        trainer.coder.load_state_dict(c.coder.state_dict())
    ckpt.restore_adam_state(trainer.optimizer, trainer.param_names, c.optimizer_state,
                            c.folder / ckpt.OPTIMIZER_NAME)
    trainer.tracker.tokens_since_fired = since.to(trainer.device, torch.int64).clone()
    try:
        trainer.generator.set_state(c.tensors["rng.probes"])
        if "rng.torch_cpu" in c.tensors:
            torch.set_rng_state(c.tensors["rng.torch_cpu"])
    except (RuntimeError, TypeError) as exc:
        raise CoderFileError(where, f"bad random-generator state ({exc})") from None
    trainer.step_count, trainer.tokens_seen = c.step, c.tokens
    trainer.elapsed_s = c.elapsed_s
    trainer.metrics_history = list(c.metrics)
    trainer.forget_dead_count()
    if stream is not None and c.stream_state is not None:
        stream.load_state_dict(c.stream_state)
        trainer.pending_stream_state = None
    else:
        trainer.pending_stream_state = c.stream_state
    return c
