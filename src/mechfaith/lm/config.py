"""Configs of the LM commands: :class:`LMConfig` (model, layer, sites, data amounts, device),
:class:`LMCoderConfig` (the coder's architecture and data-driven initialisation) and the LM
defaults of the training options (:data:`LM_TRAIN_DEFAULTS`, :func:`lm_train_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechfaith.coders.config import ACTIVATIONS, DECODER_NORMS, KINDS, CoderConfig
from mechfaith.coders.init import SKIP_INITS
from mechfaith.configs import check_finite, config_from_dict, doc
from mechfaith.errors import ConfigError
from mechfaith.lm.activations import STORAGE_DTYPES
from mechfaith.lm.adapters import INPUT_SITES
from mechfaith.training.config import TrainConfig

# Attention-sink cut (x the median MLP output norm): left out of a streamed set's training, kept by its splice.
MASSIVE_RATIO = 50.0


@dataclass
class LMConfig:
    """Which model, layer and activation sites; how much data; where to compute."""

    model: str = doc("Model: a built-in (smollm2-135m, minilm-l6-v2, gpt2-random, "
                     "random-gpt2/llama/bert), a local transformers folder or a hub name.",
                     "smollm2-135m")
    layer: int = doc("Layer whose MLP the coder replaces; -1: the middle layer (n_layers // 2, "
                     "15 for SmolLM2-135M).", -1)
    input_site: str = doc("Coder input: mlp_in (after the pre-MLP norm), mlp_in_normalized (norm "
                          "without its affine) or resid_pre.", "mlp_in", choices=INPUT_SITES)
    output_site: str = doc("Coder target: mlp_out or mlp_out_centered (LayerNorm models only).",
                           "mlp_out", choices=("mlp_out", "mlp_out_centered"))
    train_tokens: int = doc("Training tokens to collect (BOS positions not counted when excluded).",
                            150_000)
    eval_contexts: int = doc("Held-out contexts (from validation documents) for evaluation.", 64)
    exclude_bos: bool = doc("Leave the BOS position out of training and of the statistics (its "
                            "activations are atypical); eval reports its L0 separately.", True)
    massive_ratio: float = doc("A set streamed from the model leaves out of training the tokens whose MLP output "
                               "norm exceeds this multiple of the median at any of its layers (attention sinks "
                               "with 'massive activations': SmolLM2 layer 11 writes norms near 25,000 against a "
                               "median of 30 there); 0 keeps every token.", MASSIVE_RATIO)
    batch_contexts: int = doc("Contexts per forward pass of the model (collection and eval).", 32)
    storage_dtype: str = doc("dtype of the activation cache on disk.", "float32",
                             choices=tuple(STORAGE_DTYPES))
    stream_block_tokens: int = doc("Rows per block when a set of layers trains straight from the model (each "
                                   "block is shuffled and served in batches; memory: rows x layers x "
                                   "(d_in + d_out) x 4 bytes, 1.1 GB for SmolLM2's 30 layers at 8192).", 8192)
    device: str = doc("Torch device for the model and the coder (cpu, cuda, ...).", "cpu", kind="device")
    dtype: str = doc("dtype of the model's weights.", "float32", choices=("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.massive_ratio >= 0:
            raise ConfigError(f"LMConfig.massive_ratio must be >= 0, got {self.massive_ratio}")
        if self.layer < -1:
            raise ConfigError(f"LMConfig.layer must be >= 0 (or -1 for the middle layer), got {self.layer}")
        for name in ("train_tokens", "eval_contexts", "batch_contexts", "stream_block_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LMConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass
class LMCoderConfig:
    """The coder's architecture (its input and output widths come from the model)."""

    kind: str = doc("'transcoder' (MLP input -> MLP output) or 'sae' (reconstructs the input site).",
                    "transcoder", choices=KINDS)
    n_latents: int = doc("Number of latents; 0: expansion x d_in.", 0)
    expansion: int = doc("Latents per input dimension when n_latents is 0 (8 x 576 = 4608 for "
                         "SmolLM2-135M).", 8)
    activation: str = doc("Latent activation: topk, batchtopk, relu (needs --sparsity l1) or "
                          "jumprelu (needs --sparsity l0).", "topk", choices=ACTIVATIONS)
    k: int = doc("Active latents per token for topk / batchtopk.", 64)
    skip: bool = doc("Linear skip connection x W_skip (transcoders): lifts FVE by about 0.1.", True)
    skip_init: str = doc("Initial W_skip and b_dec: lstsq (least-squares fit of the target from "
                         "the input on the first cached rows; the latents then learn the rest) or "
                         "zero.", "lstsq", choices=SKIP_INITS)
    decoder_norm: str = doc("'unit' (decoder rows kept at unit norm) or 'penalty'.", "unit",
                            choices=DECODER_NORMS)
    jumprelu_threshold: float = doc("Initial JumpReLU threshold.", 1e-3)
    jumprelu_bandwidth: float = doc("JumpReLU straight-through kernel width.", 1e-3)
    latent_init_fraction: float = doc("Initial RMS of the latents' contribution as a fraction of what the "
                                      "skip and bias leave unexplained (0: no rescaling of the encoder).",
                                      0.3)
    center_encoder: bool = doc("Initialise b_enc = -mean(x) W_enc (the encoder sees centred inputs; "
                               "fewer dead latents).", True)
    init_seed: int = doc("Seed of the coder's random initialisation.", 0)
    sparse_decode: bool = doc("TopK / BatchTopK / JumpReLU: train with the sparse paths (decode only the "
                              "active latents, forward and backward; about 3.5x faster steps on CPU, the same "
                              "result up to float rounding).", True)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.n_latents < 0 or self.expansion <= 0:
            raise ConfigError("LMCoderConfig: n_latents must be >= 0 and expansion positive")
        if self.k < 1:
            raise ConfigError(f"LMCoderConfig.k must be a positive integer, got {self.k}")
        if not (self.jumprelu_threshold > 0 and self.jumprelu_bandwidth > 0):
            raise ConfigError("LMCoderConfig: jumprelu_threshold and jumprelu_bandwidth must be > 0")
        if self.latent_init_fraction < 0:
            raise ConfigError("LMCoderConfig.latent_init_fraction must be >= 0")

    def coder_config(self, d_in: int, d_out: int) -> CoderConfig:
        n = self.n_latents or self.expansion * d_in
        return CoderConfig(d_in=d_in, n_latents=n, d_out=d_out if self.kind == "transcoder" else d_in,
                           kind=self.kind, activation=self.activation, k=min(self.k, n),
                           jumprelu_threshold=self.jumprelu_threshold,
                           jumprelu_bandwidth=self.jumprelu_bandwidth,
                           skip=self.skip and self.kind == "transcoder", decoder_norm=self.decoder_norm,
                           # unit rows: the LM defaults (latent_init_fraction, lr) were tuned with them
                           init_scale=1.0)


def check_run_configs(coder_cfg: LMCoderConfig, train_cfg: TrainConfig, sae_site: str = "input") -> None:
    """Raise :class:`ConfigError` when the coder and the training settings do not go together (checked
    before any model is loaded or any activation collected, so a bad pair fails at once)."""
    if sae_site not in ("input", "output"):
        raise ConfigError(f"sae_site must be 'input' or 'output', not {sae_site!r}")
    if coder_cfg.activation == "relu" and train_cfg.sparsity == "none":
        raise ConfigError("a ReLU coder needs a sparsity penalty: add --sparsity l1 (and a --sparsity-coef)")
    if coder_cfg.activation == "jumprelu" and train_cfg.sparsity != "l0":
        raise ConfigError("a JumpReLU coder is trained with --sparsity l0")
    if train_cfg.sparsity == "l0" and coder_cfg.activation != "jumprelu":
        raise ConfigError("the l0 penalty needs a JumpReLU coder (--activation jumprelu)")
    if train_cfg.jacobian_coef > 0 and coder_cfg.kind != "transcoder":
        raise ConfigError("Jacobian matching needs a transcoder (an SAE has no MLP to match)")


# Defaults of the training options for LM coders, on top of TrainConfig's own (the CLI applies
# them below the config file and the flags).
LM_TRAIN_DEFAULTS: dict[str, Any] = {
    "n_steps": 300, "batch_size": 1024, "lr": 5e-4, "lr_warmup_steps": 20, "sparsity": "none",
    "log_every": 25, "checkpoint_every": 100, "dead_window": 50_000,
}


def lm_train_config(**overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` with :data:`LM_TRAIN_DEFAULTS` (and ``overrides``) applied."""
    return config_from_dict(TrainConfig, {**LM_TRAIN_DEFAULTS, **overrides})


# Defaults of a replacement set (``lm train --layers``), applied below the config file and the flags:
# sized so that all 30 layers of SmolLM2-135M (2304-latent TopK transcoders with a skip, 205k tokens)
# train in under an hour on a 2-core CPU, straight from the model (README, "A transcoder at every layer").
# The model's forward pass alone costs about 7 ms per token there, the 30 coders about as much.
SET_PROFILE: dict[str, dict[str, Any]] = {
    "lm": {"train_tokens": 206_000},
    "coder": {"k": 32, "expansion": 4},
    "train": {"n_steps": 200, "checkpoint_every": 50},
}
# ``--quick``: a smoke test of the same pipeline in a few minutes (one layer or a set).
QUICK_PROFILE: dict[str, dict[str, Any]] = {
    "lm": {"train_tokens": 31_000, "eval_contexts": 16},
    "coder": {"k": 32, "expansion": 4},
    "train": {"n_steps": 30, "log_every": 10, "checkpoint_every": 15},
}

