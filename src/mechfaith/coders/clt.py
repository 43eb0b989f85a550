"""The cross-layer transcoder (CLT): one encoder per layer, decoders to that layer and later ones.

Shapes (layer-major: block layer first, so every per-layer product is one batched matmul)::

    W_enc [L, d_in, n]   b_enc [L, n]   log_threshold [L, n] (JumpReLU)
    W_dec_s [n, R_s, d_out] for each source layer s (R_s = cfg.n_targets(s) targets s .. s+R_s-1)
    b_dec [L, d_out]     W_skip [L, d_in, d_out] (optional)

    x     [L, B, d_in]   each block layer's MLP input (B tokens)
    pre   = x[s] W_enc[s] + b_enc[s]                                  [L, B, n]
    f     = act(pre)                                                  [L, B, n]
    y_hat[t] = b_dec[t] + sum_{s <= t < s + R_s} f[s] W_dec_s[:, t - s] (+ x[t] W_skip[t])   [L, B, d_out]

Memory: the decoders hold ``n d_out sum_s R_s`` numbers, ``n d_out L (L + 1) / 2`` for a full
CLT; a block of layers (``first_layer``, ``n_layers``) or a limited ``reach`` keeps it in bounds.
With ``reach = 0`` the CLT is a set of per-layer transcoders (:meth:`CrossLayerTranscoder.from_coders`
builds one from such a set, :meth:`CrossLayerTranscoder.layer_coder` gives a layer back).

Jacobian (what Jacobian matching of a CLT matches): the *local* Jacobian of the reconstructed MLP
output at layer t with respect to that layer's MLP input, every other layer's input held at its
value. Only layer t's own latents and skip depend on x[t], so ::

    J_t = W_dec_t[:, 0]^T diag(mask[t]) W_enc[t]^T (+ W_skip[t]^T)      [d_out, d_in]

the same form as a per-layer transcoder's; :meth:`CrossLayerTranscoder.local_jvp` gives ``J_t v[t]``
for every t at once (one product per layer). The real model's counterpart is each MLP's Jacobian
with respect to its own input. Latents of earlier layers writing to layer t do not appear in J_t:
they are functions of earlier inputs, which is exactly how a CLT can write a later layer's output
without reading that layer's input (the shortcut the multi-hop toy measures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from mechfaith.coders import activations as acts
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.errors import ConfigError, InputError


@dataclass
class CLTOutput:
    """What one forward pass of a CLT yields (layer-major)."""

    y_hat: Tensor  # [L, B, d_out]
    f: Tensor  # [L, B, n]
    pre: Tensor  # [L, B, n]
    mask: Tensor  # [L, B, n] bool, d f / d pre


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder (see the module docstring for shapes and the Jacobian)."""

    log_threshold: nn.Parameter | None
    W_skip: nn.Parameter | None

    def __init__(self, cfg: CLTConfig, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        L, d_in, n, d_out = cfg.n_layers, cfg.d_in, cfg.n_latents, int(cfg.d_out)  # type: ignore[arg-type]
        self.W_enc = nn.Parameter(torch.empty(L, d_in, n, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(L, n, dtype=dtype))
        for s in range(L):
            self.register_parameter(f"W_dec_{s}", nn.Parameter(torch.empty(n, cfg.n_targets(s), d_out, dtype=dtype)))
        self.b_dec = nn.Parameter(torch.zeros(L, d_out, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(L, d_in, d_out, dtype=dtype)) if cfg.skip else None
        if cfg.activation == "jumprelu":
            log_t = float(torch.log(torch.tensor(cfg.jumprelu_threshold)))
            self.log_threshold = nn.Parameter(torch.full((L, n), log_t, dtype=dtype))
        else:
            self.log_threshold = None
        self.reset_parameters(generator)

    @staticmethod
    def state_shapes(cfg: CLTConfig) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of ``state_dict()`` for ``cfg``, known without allocating anything."""
        L, d_in, n, d_out = cfg.n_layers, cfg.d_in, cfg.n_latents, int(cfg.d_out)  # type: ignore[arg-type]
        shapes: dict[str, tuple[int, ...]] = {"W_enc": (L, d_in, n), "b_enc": (L, n)}
        for s in range(L):
            shapes[f"W_dec_{s}"] = (n, cfg.n_targets(s), d_out)
        shapes["b_dec"] = (L, d_out)
        if cfg.skip:
            shapes["W_skip"] = (L, d_in, d_out)
        if cfg.activation == "jumprelu":
            shapes["log_threshold"] = (L, n)
        return shapes

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random directions: encoder columns of norm ``init_scale``; each latent's decoder rows of
        norm ``init_scale / sqrt(R_s)`` (their concatenation has norm ``init_scale``); biases zero."""
        cfg = self.cfg
        scale = cfg.init_scale
        for s in range(cfg.n_layers):
            w = self.W_dec(s)
            r = torch.randn(w.shape, generator=generator, dtype=w.dtype)
            w.copy_(r * (scale / w.shape[1] ** 0.5 / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)))
        e = torch.randn(self.W_enc.shape, generator=generator, dtype=self.W_enc.dtype)
        self.W_enc.copy_(e * (scale / e.norm(dim=1, keepdim=True).clamp_min(1e-12)))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    # ------------------------------------------------------------------ sizes
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def n_latents(self) -> int:
        """Latents per layer."""
        return self.cfg.n_latents

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return int(self.cfg.d_out)  # type: ignore[arg-type]

    def W_dec(self, source: int) -> nn.Parameter:
        """Decoder of block layer ``source``: [n, R_source, d_out]."""
        param: nn.Parameter = getattr(self, f"W_dec_{source}")
        return param

    def decoders(self) -> list[nn.Parameter]:
        return [self.W_dec(s) for s in range(self.n_layers)]

    def decoder_to(self, source: int, target: int) -> Tensor:
        """Decoder rows from block layer ``source`` to block layer ``target``: [n, d_out]."""
        if not 0 <= source <= target < source + self.cfg.n_targets(source):
            raise IndexError(f"layer {source} does not write to layer {target}")
        return self.W_dec(source)[:, target - source]

    def sources_of(self, target: int) -> list[int]:
        """Block layers whose latents write to block layer ``target``."""
        return [s for s in range(target + 1) if target < s + self.cfg.n_targets(s)]

    def threshold(self) -> Tensor:
        """JumpReLU thresholds [L, n]."""
        if self.log_threshold is None:
            raise AttributeError("only JumpReLU CLTs have learned thresholds")
        return self.log_threshold.exp()

    def check_input(self, x: Tensor, name: str = "x") -> Tensor:
        """Raise :class:`InputError` unless ``x`` is a floating tensor [L, B, d_in]."""
        if not isinstance(x, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.ndim != 3 or x.shape[0] != self.n_layers or x.shape[2] != self.d_in:
            raise InputError(f"{name} has shape {tuple(x.shape)}; expected [{self.n_layers}, batch, "
                             f"{self.d_in}] (layers, tokens, d_in)")
        return x

    # ------------------------------------------------------------------ passes
    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations [L, B, n]."""
        return torch.baddbmm(self.b_enc.unsqueeze(1), x, self.W_enc)

    def activate(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Latents and their derivative mask (per token and layer)."""
        cfg = self.cfg
        if cfg.activation == "relu":
            return acts.relu(pre)
        if cfg.activation == "topk":
            return acts.topk(pre, cfg.k)
        return acts.jumprelu(pre, self.threshold().unsqueeze(1), cfg.jumprelu_bandwidth)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """``y_hat`` [L, B, d_out] from latents f [L, B, n] (+ the skip when x is given)."""
        L, B = f.shape[0], f.shape[1]
        d = self.d_out
        parts: list[list[Tensor]] = [[] for _ in range(L)]
        for s in range(L):
            w = self.W_dec(s)  # [n, R, d]
            out = (f[s] @ w.reshape(w.shape[0], -1)).view(B, w.shape[1], d)
            for r in range(w.shape[1]):
                parts[s + r].append(out[:, r])
        ys = [torch.stack(p).sum(0) if len(p) > 1 else p[0] for p in parts]
        y = torch.stack(ys) + self.b_dec.unsqueeze(1)
        if self.W_skip is not None and x is not None:
            y = torch.baddbmm(y, x, self.W_skip)
        return y

    def forward_full(self, x: Tensor) -> CLTOutput:
        """Forward pass returning every intermediate (x [L, B, d_in])."""
        pre = self.encode_pre(x)
        f, mask = self.activate(pre)
        return CLTOutput(self.decode(f, x), f, pre, mask)

    def forward(self, x: Tensor) -> Tensor:
        """``y_hat`` [L, B, d_out] for x [L, B, d_in]."""
        return self.forward_full(self.check_input(x)).y_hat

    def encode(self, x: Tensor) -> Tensor:
        """Latents [L, B, n]."""
        return self.activate(self.encode_pre(self.check_input(x)))[0]

    def encode_layer(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f, pre)`` [..., n] of block layer ``layer`` for its inputs x [..., d_in] (any leading
        shape: a model's [batch, seq, d] too); the same values as :meth:`forward_full`'s row."""
        pre = x @ self.W_enc[layer] + self.b_enc[layer]
        cfg = self.cfg
        if cfg.activation == "relu":
            f, _ = acts.relu(pre)
        elif cfg.activation == "topk":
            f, _ = acts.topk(pre, cfg.k)
        else:
            f, _ = acts.jumprelu(pre, self.threshold()[layer], cfg.jumprelu_bandwidth)
        return f, pre

    def decode_layer(self, layer: int, latents: Mapping[int, Tensor], x: Tensor | None = None) -> Tensor:
        """The reconstructed output [..., d_out] of block layer ``layer`` from the latents of every
        layer that writes to it (``latents[s]`` [..., n] for each s in :meth:`sources_of`), plus the
        skip of that layer's input ``x`` when given."""
        y = self.b_dec[layer]
        for s in self.sources_of(layer):
            if s not in latents:
                raise InputError(f"decode_layer({layer}) needs the latents of layer {s}")
            y = y + latents[s] @ self.decoder_to(s, layer)
        if self.W_skip is not None and x is not None:
            y = y + x @ self.W_skip[layer]
        return y

    def local_jvp(self, out: CLTOutput, v: Tensor) -> Tensor:
        """``J_t v[t]`` for every block layer t [L, B, d_out], tangents v [L, B, d_in], given the
        forward pass at x (the local Jacobian of the module docstring)."""
        t = torch.bmm(v, self.W_enc) * out.mask.to(self.W_enc.dtype)  # [L, B, n]
        own = torch.stack([self.W_dec(s)[:, 0] for s in range(self.n_layers)])  # [L, n, d_out]
        jv = torch.bmm(t, own)
        if self.W_skip is not None:
            jv = torch.baddbmm(jv, v, self.W_skip)
        return jv

    # ------------------------------------------------------------------ decoder norms
    def decoder_norms(self) -> Tensor:
        """Each latent's decoder norm summed over its target layers: [L, n]."""
        return torch.stack([self.W_dec(s).norm(dim=-1).sum(dim=-1) for s in range(self.n_layers)])

    # ------------------------------------------------------------------ per-layer sets
    @classmethod
    def from_coders(cls, coders: Sequence[SparseCoder], first_layer: int = 0) -> "CrossLayerTranscoder":
        """A ``reach = 0`` CLT holding a set of per-layer transcoders (copies of their weights).

        The coders must share d_in, d_out, width, activation (relu, topk or jumprelu), k and skip.
        """
        if not coders:
            raise ConfigError("CrossLayerTranscoder.from_coders: no coders given")
        c0 = coders[0].cfg
        for c in coders:
            keys = ("d_in", "d_out", "n_latents", "activation", "k", "skip", "kind")
            if any(getattr(c.cfg, k) != getattr(c0, k) for k in keys):
                raise ConfigError("from_coders: the coders must share d_in, d_out, n_latents, activation, k and skip")
        if c0.activation not in ("relu", "topk", "jumprelu") or c0.kind != "transcoder":
            raise ConfigError(f"from_coders: a CLT holds relu, topk or jumprelu transcoders, not {c0.activation} {c0.kind}")
        cfg = CLTConfig(n_layers=len(coders), d_in=c0.d_in, n_latents=c0.n_latents, d_out=c0.d_out,
                        first_layer=first_layer, reach=0, activation=c0.activation, k=c0.k,
                        jumprelu_threshold=c0.jumprelu_threshold, jumprelu_bandwidth=c0.jumprelu_bandwidth,
                        skip=c0.skip)
        clt = cls(cfg, dtype=coders[0].W_enc.dtype)
        with torch.no_grad():
            for s, c in enumerate(coders):
                clt.W_enc[s].copy_(c.W_enc)
                clt.b_enc[s].copy_(c.b_enc)
                clt.W_dec(s)[:, 0].copy_(c.W_dec)
                clt.b_dec[s].copy_(c.b_dec)
                if clt.W_skip is not None and c.W_skip is not None:
                    clt.W_skip[s].copy_(c.W_skip)
                if clt.log_threshold is not None and c.log_threshold is not None:
                    clt.log_threshold[s].copy_(c.log_threshold)
        return clt

    @torch.no_grad()
    def layer_view(self, layer: int) -> SparseCoder:
        """Block layer ``layer``'s encoder, activation, own decoder, bias and skip as a
        :class:`SparseCoder` (a copy): its latents are the CLT's latents of that layer exactly; its
        output is only the own-layer part of the reconstruction (add the writes of earlier layers,
        :meth:`decoder_to`, for the whole)."""
        cfg = self.cfg
        ccfg = CoderConfig(d_in=cfg.d_in, n_latents=cfg.n_latents, d_out=cfg.d_out, kind="transcoder",
                           activation=cfg.activation, k=cfg.k, jumprelu_threshold=cfg.jumprelu_threshold,
                           jumprelu_bandwidth=cfg.jumprelu_bandwidth, skip=cfg.skip, decoder_norm="penalty")
        coder = SparseCoder(ccfg, dtype=self.W_enc.dtype).to(self.W_enc.device)
        coder.W_enc.copy_(self.W_enc[layer])
        coder.b_enc.copy_(self.b_enc[layer])
        coder.W_dec.copy_(self.W_dec(layer)[:, 0])
        coder.b_dec.copy_(self.b_dec[layer])
        if coder.W_skip is not None and self.W_skip is not None:
            coder.W_skip.copy_(self.W_skip[layer])
        if coder.log_threshold is not None and self.log_threshold is not None:
            coder.log_threshold.copy_(self.log_threshold[layer])
        return coder

    def layer_coder(self, layer: int) -> SparseCoder:
        """Block layer ``layer`` as a per-layer transcoder (a copy); only when nothing else writes to
        that layer's output and its latents write nowhere else (``reach = 0``)."""
        if self.cfg.n_targets(layer) != 1 or self.sources_of(layer) != [layer]:
            raise ConfigError(f"layer {layer} of this CLT is not a per-layer transcoder (its reach is "
                              f"{self.cfg.reach}); only a reach-0 CLT splits into per-layer coders")
        return self.layer_view(layer)
