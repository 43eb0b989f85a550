"""The training configuration: every field documented (the docs become the CLI's help)."""

from __future__ import annotations

from dataclasses import dataclass

from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError

LR_DECAYS = ("none", "linear", "cosine")
SPARSITY_PENALTIES = ("none", "l1", "tanh_l1", "l0")


@dataclass
class TrainConfig:
    """How to train a sparse coder: optimiser, schedules, loss terms, dead latents, logging."""

    n_steps: int = doc("Number of optimiser steps (one batch each).", 10_000)
    batch_size: int = doc("Rows per batch for streams built from this config (the trainer itself "
                          "takes whatever batches the stream yields).", 1024)
    lr: float = doc("Peak learning rate of Adam (about 5e-4 for LM transcoders; higher rates "
                    "kill latents).", 5e-4)
    adam_beta1: float = doc("Adam beta1.", 0.9)
    adam_beta2: float = doc("Adam beta2.", 0.999)
    adam_eps: float = doc("Adam epsilon.", 1e-8)
    lr_warmup_steps: int = doc("Steps of linear learning-rate warm-up from lr/warmup to lr (0 = none).", 100)
    lr_decay: str = doc("Learning-rate decay over the last lr_decay_frac of the steps: none, linear "
                        "or cosine, down to lr * lr_final_frac.", "linear", choices=LR_DECAYS)
    lr_decay_frac: float = doc("Fraction of the steps, at the end of training, over which the "
                               "learning rate decays.", 0.2)
    lr_final_frac: float = doc("Final learning rate as a fraction of lr.", 0.0)
    sparsity: str = doc("Sparsity penalty: none (e.g. TopK coders), l1 (sum_i f_i ||W_dec,i||), "
                        "tanh_l1 (sum_i tanh(c f_i ||W_dec,i||)) or l0 (JumpReLU, straight-through).",
                        "l1", choices=SPARSITY_PENALTIES)
    sparsity_coef: float = doc("Sparsity coefficient lambda (its scale depends on the data: the "
                               "reconstruction loss is the squared error summed over output "
                               "dimensions, averaged over the batch).", 1e-3)
    tanh_scale: float = doc("Scale c inside tanh_l1.", 4.0)
    threshold_lr_scale: float = doc("JumpReLU: the thresholds' learning rate as a multiple of lr. The L0 "
                                    "penalty's gradient reaches only the thresholds and Adam moves each "
                                    "by about lr a step whatever lambda is, so in short runs this, not "
                                    "lambda, decides whether they keep up with a growing encoder.", 1.0)
    sparsity_warmup_steps: int = doc("Steps of linear warm-up of the sparsity coefficient from 0 "
                                     "(0 = full coefficient from the first step).", 0)
    jacobian_coef: float = doc("Coefficient of Jacobian matching E_v ||J_ref v - J_coder v||^2 "
                               "(needs a reference function; 0 = off).", 0.0)
    n_probes: int = doc("Gaussian probe vectors per input for Jacobian matching.", 1)
    jacobian_contribution_coef: float = doc("Coefficient of the per-feature Jacobian-contribution "
                                            "penalty sum_i 1[pre_i > 0] ||W_enc,i|| ||W_dec,i|| "
                                            "(0 = off).", 0.0)
    dead_window: int = doc("Tokens (rows) without firing after which a latent counts as dead.", 1_000_000)
    auxk_coef: float = doc("Coefficient of the AuxK loss that reconstructs the residual from dead "
                           "latents (Gao et al. 2024 use 1/32; 0 = off).", 1 / 32)
    auxk_k: int = doc("Dead latents (largest pre-activations) used per row by the AuxK loss.", 256)
    grad_clip: float = doc("Clip the global gradient norm to this value (0 = off).", 0.0)
    log_every: int = doc("Compute metrics and write a log line every this many steps (and at the "
                         "last step).", 100)
    checkpoint_every: int = doc("Write a checkpoint every this many steps (0 = only at the end; "
                                "needs a checkpoint folder).", 1000)
    seed: int = doc("Seed of the trainer's random numbers (Jacobian-matching probes).", 0)
    device: str = doc("Torch device to train on (cpu, cuda, cuda:1, ...).", "cpu", kind="device")

    def __post_init__(self) -> None:
        check_finite(self)
        positive_ints = ("n_steps", "batch_size", "n_probes", "dead_window", "auxk_k", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("lr_warmup_steps", "sparsity_warmup_steps", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"TrainConfig.{name} must be in [0, 1), got {value!r}")
        if not self.adam_eps > 0:
            raise ConfigError(f"TrainConfig.adam_eps must be > 0, got {self.adam_eps!r}")
        for name in ("lr_decay_frac", "lr_final_frac"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"TrainConfig.{name} must be in [0, 1], got {value!r}")
        for name in ("sparsity_coef", "jacobian_coef", "jacobian_contribution_coef", "auxk_coef",
                     "grad_clip"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("tanh_scale", "threshold_lr_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"TrainConfig.lr_decay {self.lr_decay!r} is not one of {', '.join(LR_DECAYS)}")
        if self.sparsity not in SPARSITY_PENALTIES:
            raise ConfigError(f"TrainConfig.sparsity {self.sparsity!r} is not one of "
                              f"{', '.join(SPARSITY_PENALTIES)}")
