"""The configuration of a cross-layer transcoder (architecture only; training lives in ``training``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError

CLT_ACTIVATIONS = ("jumprelu", "topk", "relu")


@dataclass
class CLTConfig:
    """A cross-layer transcoder over a contiguous block of ``n_layers`` layers.

    Latents of block layer ``s`` read that layer's MLP input and write to the MLP outputs of
    layers ``s .. min(s + reach, n_layers - 1)``. ``reach = 0`` is a per-layer transcoder set.
    """

    n_layers: int = doc("Layers in the block (L).")
    d_in: int = doc("Input dimension at every layer (the MLP input width, d_model).")
    n_latents: int = doc("Latents per layer (the CLT has n_layers x n_latents features).")
    d_out: Optional[int] = doc("Output dimension at every layer; None means d_in.", None)
    first_layer: int = doc("The model's index of the block's first layer (block layer s is model "
                           "layer first_layer + s).", 0)
    reach: Optional[int] = doc("How many later layers each latent also writes to (None: every later "
                               "layer of the block; 0: its own layer only, a per-layer transcoder "
                               "set). Decoder parameters grow as n_latents x d_out x the number of "
                               "(source, target) pairs: L (L + 1) / 2 blocks for a full CLT.", None)
    activation: str = doc("Latent activation: jumprelu (learned per-latent threshold, "
                          "straight-through gradient), topk (k per token and layer) or relu.",
                          "jumprelu", choices=CLT_ACTIVATIONS)
    k: int = doc("Active latents per token and layer for topk.", 32)
    jumprelu_threshold: float = doc("Initial JumpReLU threshold (every latent).", 1e-3)
    jumprelu_bandwidth: float = doc("Width of the rectangle kernel of JumpReLU's straight-through "
                                    "threshold gradient.", 1e-3)
    skip: bool = doc("A linear skip per layer: y_hat[t] += x[t] W_skip[t].", False)
    init_scale: float = doc("Norm of each encoder column and of each latent's decoder rows "
                            "concatenated over its target layers, at initialisation.", 1.0)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.d_out is None:
            self.d_out = self.d_in
        for name in ("n_layers", "d_in", "n_latents", "d_out", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"CLTConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.first_layer, int) or isinstance(self.first_layer, bool) or self.first_layer < 0:
            raise ConfigError(f"CLTConfig.first_layer must be an integer >= 0, got {self.first_layer!r}")
        if self.reach is not None and (not isinstance(self.reach, int) or isinstance(self.reach, bool)
                                       or self.reach < 0):
            raise ConfigError(f"CLTConfig.reach must be None or an integer >= 0, got {self.reach!r}")
        if self.activation not in CLT_ACTIVATIONS:
            raise ConfigError(f"CLTConfig.activation {self.activation!r} is not one of {', '.join(CLT_ACTIVATIONS)}")
        if self.activation == "topk" and self.k > self.n_latents:
            raise ConfigError(f"CLTConfig.k = {self.k} exceeds n_latents = {self.n_latents}")
        if not self.init_scale > 0:
            raise ConfigError(f"CLTConfig.init_scale must be > 0, got {self.init_scale!r}")
        if self.jumprelu_threshold <= 0 or self.jumprelu_bandwidth <= 0:
            raise ConfigError("CLTConfig: jumprelu_threshold and jumprelu_bandwidth must be > 0")

    @property
    def layers(self) -> list[int]:
        """The model's layer indices of the block."""
        return list(range(self.first_layer, self.first_layer + self.n_layers))

    def n_targets(self, source: int) -> int:
        """How many layers block layer ``source`` writes to (itself included)."""
        last = self.n_layers - 1 if self.reach is None else min(self.n_layers - 1, source + self.reach)
        return last - source + 1

    def n_parameters(self) -> int:
        """Parameters of a CLT of this configuration (what memory grows with)."""
        L, d, n, d_out = self.n_layers, self.d_in, self.n_latents, int(self.d_out)  # type: ignore[arg-type]
        pairs = sum(self.n_targets(s) for s in range(L))
        total = L * (d * n + n) + pairs * n * d_out + L * d_out
        if self.skip:
            total += L * d * d_out
        if self.activation == "jumprelu":
            total += L * n
        return total
