"""Training sparse coders on any stream of (input, target) batches: one engine for every caller.

- ``config``: :class:`TrainConfig`, every training option, documented.
- ``engine``: :class:`Engine` and :func:`run_step`, the one training loop: any number of members
  from one stream, one host sync per step, a NaN guard that stops every member, logs, checkpoints.
- ``trainer``: :class:`Trainer` / :func:`train`, one :class:`~mechfaith.coders.SparseCoder` as a
  member: lr warm-up/decay, sparsity warm-up, Jacobian matching, the Jacobian-contribution penalty,
  AuxK, data-parallel sync; ``trainer_state`` saves and restores its checkpoints.
- ``stack``, ``stack_losses``, ``stack_trainer``: :class:`CoderStack`, K coders as one batched model
  (widths, k and coefficients per member) and :class:`StackTrainer`, its member (the toy's grid, sweeps).
- ``optim``: Adam and the gradient-norm helpers; ``schedules``: lr and sparsity schedules;
  ``dead_latents``: the tracker and AuxK; ``jacobian_matching`` / ``fast_jvp``: the JVP term;
  ``metrics``: FVE and friends; ``streams``: :class:`TensorStream`, :class:`FunctionStream`,
  :class:`IterableStream`; ``checkpoint``: the checkpoint files; ``distributed``: torchrun data
  parallelism; ``demo``: the synthetic task of ``mechfaith train``.
"""

from mechfaith.training.checkpoint import Checkpoint, is_checkpoint, load_checkpoint, save_checkpoint
from mechfaith.training.config import TrainConfig
from mechfaith.training.dead_latents import DeadLatentTracker, auxk_loss
from mechfaith.training.engine import Engine, run_step
from mechfaith.training.jacobian_matching import JacobianMatch, jacobian_matching
from mechfaith.training.schedules import lr_at, sparsity_coef_at
from mechfaith.training.stack import CoderStack, StackMember
from mechfaith.training.stack_trainer import StackTrainer
from mechfaith.training.streams import BatchStream, FunctionStream, IterableStream, TensorStream, as_stream
from mechfaith.training.trainer import LossTerms, Trainer, TrainResult, train

__all__ = ["BatchStream", "Checkpoint", "CoderStack", "DeadLatentTracker", "Engine", "FunctionStream",
           "IterableStream", "JacobianMatch", "LossTerms", "StackMember", "StackTrainer", "TensorStream",
           "TrainConfig", "TrainResult", "Trainer", "as_stream", "auxk_loss", "is_checkpoint",
           "jacobian_matching", "load_checkpoint", "lr_at", "run_step", "save_checkpoint",
           "sparsity_coef_at", "train"]
