"""Training sparse coders on any stream of (input, target) batches.

- :class:`TrainConfig` (``config``): every training option, documented.
- :class:`Trainer` / :func:`train` (``trainer``): Adam with lr warm-up/decay, sparsity warm-up,
  Jacobian matching, the Jacobian-contribution penalty, AuxK for dead latents, JSONL metrics,
  progress bar, checkpoint/resume and a NaN/inf guard.
- streams (``streams``): :class:`TensorStream`, :class:`FunctionStream`, :class:`IterableStream`.
- checkpoints (``checkpoint``): :func:`save_checkpoint`, :func:`load_checkpoint`.
"""

from mechfaith.training.checkpoint import Checkpoint, is_checkpoint, load_checkpoint, save_checkpoint
from mechfaith.training.config import TrainConfig
from mechfaith.training.dead_latents import DeadLatentTracker, auxk_loss
from mechfaith.training.jacobian_matching import JacobianMatch, jacobian_matching
from mechfaith.training.schedules import lr_at, sparsity_coef_at
from mechfaith.training.streams import BatchStream, FunctionStream, IterableStream, TensorStream, as_stream
from mechfaith.training.trainer import LossTerms, Trainer, TrainResult, train

__all__ = ["BatchStream", "Checkpoint", "DeadLatentTracker", "FunctionStream", "IterableStream",
           "JacobianMatch", "LossTerms", "TensorStream", "TrainConfig", "TrainResult", "Trainer",
           "as_stream", "auxk_loss", "is_checkpoint", "jacobian_matching", "load_checkpoint",
           "lr_at", "save_checkpoint", "sparsity_coef_at", "train"]
