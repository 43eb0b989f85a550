"""The configuration of a sparse coder (architecture only; training choices live in ``training``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
DECODER_NORMS = ("unit", "penalty")
KINDS = ("transcoder", "sae")


@dataclass
class CoderConfig:
    """Shape and architecture of a sparse coder ``y_hat = W_dec^T act(W_enc^T x + b_enc) + b_dec``."""

    d_in: int = doc("Input dimension (e.g. the MLP input width, d_model).")
    n_latents: int = doc("Number of latents (dictionary size).")
    d_out: Optional[int] = doc("Output dimension; None means d_in (always the case for an SAE).", None)
    kind: str = doc("'transcoder' (target is another activation, e.g. an MLP's output) or 'sae' "
                    "(target is the input itself).", "transcoder", choices=KINDS)
    activation: str = doc("Latent activation: relu, topk (k per input), batchtopk (k per input on "
                          "average over a batch; a learned threshold at inference) or jumprelu "
                          "(learned per-latent threshold, straight-through gradient).",
                          "relu", choices=ACTIVATIONS)
    k: int = doc("Active latents per input for topk/batchtopk.", 32)
    jumprelu_threshold: float = doc("Initial JumpReLU threshold (same for every latent).", 1e-3)
    jumprelu_bandwidth: float = doc("Width of the rectangle kernel in JumpReLU's straight-through "
                                    "estimator of the threshold gradient.", 1e-3)
    batchtopk_momentum: float = doc("EMA momentum of the BatchTopK inference threshold.", 0.01)
    skip: bool = doc("Add a linear skip connection y_hat += x W_skip (transcoders).", False)
    init_scale: float = doc("Norm of each decoder row, and of each encoder column, at initialisation "
                            "(encoder = decoder transpose when d_in == d_out). With unit rows a wide "
                            "coder's first outputs can be several times its target; 0.1 starts near a "
                            "zero output and often trains much faster (TopK, weak L1), while strong-L1 "
                            "coders may end denser: measure for your task.", 1.0)
    decoder_norm: str = doc("'unit': decoder rows are kept at unit norm (renormalised after each "
                            "step, gradient parallel to the row removed); 'penalty': rows are free "
                            "and sparsity penalties weight each latent by its decoder-row norm.",
                            "penalty", choices=DECODER_NORMS)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.d_out is None:
            self.d_out = self.d_in
        for name in ("d_in", "n_latents", "d_out", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"CoderConfig.{name} must be a positive integer, got {value!r}")
        if self.kind == "sae" and self.d_out != self.d_in:
            raise ConfigError(f"CoderConfig: an SAE has d_out == d_in, got {self.d_out} != {self.d_in}")
        if self.activation in ("topk", "batchtopk") and self.k > self.n_latents:
            raise ConfigError(f"CoderConfig.k = {self.k} exceeds n_latents = {self.n_latents}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"CoderConfig.activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.decoder_norm not in DECODER_NORMS:
            raise ConfigError(f"CoderConfig.decoder_norm {self.decoder_norm!r} is not one of {', '.join(DECODER_NORMS)}")
        if self.kind not in KINDS:
            raise ConfigError(f"CoderConfig.kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.init_scale > 0:
            raise ConfigError(f"CoderConfig.init_scale must be > 0, got {self.init_scale!r}")
        if self.jumprelu_threshold <= 0 or self.jumprelu_bandwidth <= 0:
            raise ConfigError("CoderConfig: jumprelu_threshold and jumprelu_bandwidth must be > 0")
        if not 0 < self.batchtopk_momentum <= 1:
            raise ConfigError(f"CoderConfig.batchtopk_momentum must be in (0, 1], got {self.batchtopk_momentum!r}")
