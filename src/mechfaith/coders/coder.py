"""The sparse coder: one module for SAEs and transcoders, ReLU/TopK/BatchTopK/JumpReLU latents.

Shapes (SAELens layout, so export is a rename):
    W_enc [d_in, n_latents], b_enc [n_latents], W_dec [n_latents, d_out], b_dec [d_out],
    W_skip [d_in, d_out] (optional), log_threshold [n_latents] (JumpReLU only).

    pre   = x W_enc + b_enc                         [batch, n_latents]
    f     = act(pre)                                [batch, n_latents]
    y_hat = f W_dec + b_dec (+ x W_skip)            [batch, d_out]

The coder's Jacobian at x is ``J = W_dec^T diag(mask) W_enc^T (+ W_skip^T)`` [d_out, d_in], with
``mask = d act / d pre`` (ReLU'(0) = 0). :meth:`SparseCoder.forward_with_jvp` returns ``J v`` next to
the forward pass, sharing its pre-activations, in closed form; tests check it against autograd.

For training, :meth:`SparseCoder.forward_full` and :meth:`SparseCoder.forward_with_jvp` run through
a fused autograd function (:mod:`mechfaith.coders.fused`: one matmul for the primal and tangent
rows, the mask applied in place, fewer [batch, n_latents] temporaries) for every activation but
JumpReLU; ``coder.fused = False`` selects plain autograd. :meth:`SparseCoder.forward` (what
``torch.func`` transforms see) is always plain.

For TopK and BatchTopK coders (``coder.sparse_jvp``, on by default for them), ``forward_with_jvp``
runs the primal as above and ``J v`` through the active latents only
(:mod:`mechfaith.coders.sparse_jvp`, O(B k d) instead of O(B n d)); ``coder.sparse_jvp = False``
selects the dense tangent path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mechfaith.coders import activations as acts
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.fused import FusedCoderFn
from mechfaith.coders.sparse_jvp import sparse_jvp
from mechfaith.errors import InputError


def _is_functorch_tensor(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (the fused path does not support them)."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


@dataclass
class CoderOutput:
    """What one forward pass yields."""

    y_hat: Tensor  # [batch, d_out] reconstruction / prediction
    f: Tensor  # [batch, n_latents] latent activations
    pre: Tensor  # [batch, n_latents] pre-activations
    mask: Tensor  # [batch, n_latents] bool, d f / d pre (almost everywhere)


class SparseCoder(nn.Module):
    """A sparse coder (SAE when ``cfg.kind == 'sae'``, transcoder otherwise)."""

    batchtopk_threshold: Tensor  # a buffer (register_buffer in __init__)
    log_threshold: nn.Parameter | None

    def __init__(self, cfg: CoderConfig, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, n, d_out = cfg.d_in, cfg.n_latents, int(cfg.d_out)  # type: ignore[arg-type]
        self.W_enc = nn.Parameter(torch.empty(d_in, n, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(n, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out, dtype=dtype)) if cfg.skip else None
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((n,), float(torch.log(torch.tensor(cfg.jumprelu_threshold))), dtype=dtype))
        else:
            self.log_threshold = None
        # Train through the fused forward/backward (coders.fused) in forward_full/forward_with_jvp;
        # a runtime switch (not saved): False gives plain autograd, e.g. to compare the two.
        self.fused = True
        # forward_with_jvp's tangent through the active latents only (coders.sparse_jvp, O(B k d)
        # instead of O(B n d)); default for TopK/BatchTopK, a runtime switch (not saved).
        self.sparse_jvp = cfg.activation in ("topk", "batchtopk")
        # BatchTopK's inference threshold (EMA of the smallest kept activation); -1 = not yet set.
        self.register_buffer("batchtopk_threshold", torch.tensor(-1.0, dtype=dtype))
        self.reset_parameters(generator)

    @staticmethod
    def state_shapes(cfg: CoderConfig) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of ``state_dict()`` of a coder with config ``cfg`` (as
        ``__init__`` makes them), known without allocating anything: loaders check a file against it."""
        d_in, n, d_out = cfg.d_in, cfg.n_latents, int(cfg.d_out)  # type: ignore[arg-type]
        shapes: dict[str, tuple[int, ...]] = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
        if cfg.skip:
            shapes["W_skip"] = (d_in, d_out)
        if cfg.activation == "jumprelu":
            shapes["log_threshold"] = (n,)
        shapes["batchtopk_threshold"] = ()
        return shapes

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows: random directions of norm ``cfg.init_scale``; encoder: the decoder's transpose
        when d_in == d_out (tied initialisation), else random columns of the same norm; biases zero."""
        n, d_out = self.W_dec.shape
        d_in = self.W_enc.shape[0]
        w = torch.randn(n, d_out, generator=generator, dtype=self.W_dec.dtype)
        w *= self.cfg.init_scale / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w)
        if d_in == d_out:
            self.W_enc.copy_(w.T)
        else:
            e = torch.randn(d_in, n, generator=generator, dtype=self.W_enc.dtype)
            self.W_enc.copy_(e * (self.cfg.init_scale / e.norm(dim=0, keepdim=True).clamp_min(1e-12)))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    def check_input(self, x: Tensor, name: str = "x") -> Tensor:
        """Raise :class:`InputError` unless ``x`` is a floating tensor [..., d_in]; flatten to 2-D."""
        if not isinstance(x, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            raise InputError(f"{name} has shape {tuple(x.shape)}; expected [..., {self.d_in}] (d_in)")
        return x.reshape(-1, self.d_in)

    def check_batch(self, x: Tensor, name: str = "x") -> Tensor:
        """Raise :class:`InputError` unless ``x`` is a floating tensor [batch, d_in] (2-D)."""
        self.check_input(x, name)
        if x.ndim != 2:
            raise InputError(f"{name} has shape {tuple(x.shape)}; expected [batch, {self.d_in}] (2-D)")
        return x

    def _check_tangent(self, x: Tensor, v: Tensor) -> None:
        """Raise :class:`InputError` unless ``v`` is [batch, d_in] or [probes, batch, d_in] like ``x``."""
        if not isinstance(v, Tensor):
            raise InputError(f"tangent v must be a torch.Tensor, got {type(v).__name__}")
        if v.dtype != x.dtype:
            raise InputError(f"tangent v has dtype {v.dtype}, the input x has {x.dtype}")
        if v.ndim not in (2, 3) or tuple(v.shape[-2:]) != tuple(x.shape):
            raise InputError(f"tangent v has shape {tuple(v.shape)}; expected {tuple(x.shape)} "
                             f"or [n_probes, {x.shape[0]}, {x.shape[1]}] for x of shape {tuple(x.shape)}")

    # ------------------------------------------------------------------ pieces
    def threshold(self) -> Tensor:
        """JumpReLU thresholds [n_latents] (exp of the learned log-threshold)."""
        if self.log_threshold is None:
            raise AttributeError("only JumpReLU coders have learned thresholds")
        return self.log_threshold.exp()

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations ``x W_enc + b_enc`` [batch, n_latents]."""
        return torch.addmm(self.b_enc, x, self.W_enc)

    def activate(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Latents and their derivative mask from pre-activations."""
        cfg = self.cfg
        if cfg.activation == "relu":
            return acts.relu(pre)
        if cfg.activation == "topk":
            return acts.topk(pre, cfg.k)
        if cfg.activation == "jumprelu":
            return acts.jumprelu(pre, self.threshold(), cfg.jumprelu_bandwidth)
        # batchtopk
        if self.training or float(self.batchtopk_threshold) < 0:
            f, mask = acts.batchtopk(pre, cfg.k)
            if self.training:
                self._update_batchtopk_threshold(f, mask)
            return f, mask
        return acts.threshold(pre, self.batchtopk_threshold)

    @torch.no_grad()
    def _update_batchtopk_threshold(self, f: Tensor, mask: Tensor) -> None:
        """EMA of the smallest kept activation (BatchTopK's inference threshold), without a host sync.

        The first update sets the threshold (it starts at -1, "not set"). Because it writes a buffer,
        a training-mode BatchTopK forward cannot run inside ``torch.func`` transforms; use eval mode
        (the threshold) or plain autograd there.
        """
        big = torch.finfo(f.dtype).max
        low = torch.where(mask, f, big).amin().to(self.batchtopk_threshold.dtype)  # +big if none kept
        thr = self.batchtopk_threshold
        m = self.cfg.batchtopk_momentum
        new = torch.where(thr < 0, low, thr + m * (low - thr))
        self.batchtopk_threshold.copy_(torch.where(low < big, new, thr))

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations [batch, n_latents]."""
        x2 = self.check_input(x)
        f, _ = self.activate(self.encode_pre(x2))
        return f.reshape(*x.shape[:-1], self.n_latents)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """``f W_dec + b_dec`` (+ ``x W_skip`` when the coder has a skip and x is given)."""
        y = torch.addmm(self.b_dec, f, self.W_dec)
        if self.W_skip is not None and x is not None:
            y = torch.addmm(y, x, self.W_skip)
        return y

    # ------------------------------------------------------------------ passes
    def _use_fused(self, x: Tensor) -> bool:
        """Whether forward_full / forward_with_jvp take the fused path (see :mod:`coders.fused`)."""
        return (self.fused and self.cfg.activation != "jumprelu" and x.ndim == 2 and x.shape[0] > 0
                and not _is_functorch_tensor(x) and not _is_functorch_tensor(self.W_enc))

    def _fused(self, x: Tensor, v: Tensor | None) -> tuple[CoderOutput, Tensor]:
        y_hat, f, pre, mask, jv = FusedCoderFn.apply(
            x, v, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.W_skip, self.activate,
            self.cfg.activation == "relu")
        return CoderOutput(y_hat, f, pre, mask), jv

    def forward_full(self, x: Tensor) -> CoderOutput:
        """Forward pass returning every intermediate (x is [batch, d_in])."""
        if self._use_fused(x):
            return self._fused(x, None)[0]
        pre = self.encode_pre(x)
        f, mask = self.activate(pre)
        return CoderOutput(self.decode(f, x), f, pre, mask)

    def forward(self, x: Tensor) -> Tensor:
        """Prediction ``y_hat`` [..., d_out] for inputs [..., d_in]."""
        x2 = self.check_input(x)
        return self.forward_full(x2).y_hat.reshape(*x.shape[:-1], self.d_out)

    def jvp_from(self, out: CoderOutput, v: Tensor) -> Tensor:
        """``J(x) v`` [batch, d_out] for tangents v [batch, d_in], given the forward pass at x."""
        # a float mask: multiplying by a bool tensor converts it on every call (several x slower)
        t = (v @ self.W_enc) * out.mask.to(self.W_enc.dtype)
        jv = t @ self.W_dec
        if self.W_skip is not None:
            jv = torch.addmm(jv, v, self.W_skip)
        return jv

    def forward_with_jvp(self, x: Tensor, v: Tensor) -> tuple[CoderOutput, Tensor]:
        """The forward pass at x [batch, d_in] and ``J(x) v`` for tangents v [batch, d_in].

        ``v`` may also be [n_probes, batch, d_in]; then ``J v`` is [n_probes, batch, d_out].
        """
        self.check_batch(x)
        self._check_tangent(x, v)
        # --- sparse tangent path (coders.sparse_jvp): primal as usual, J v through the active latents
        if (self.sparse_jvp and x.shape[0] > 0 and not _is_functorch_tensor(x)
                and not _is_functorch_tensor(v) and not _is_functorch_tensor(self.W_enc)):
            out = self.forward_full(x)
            return out, sparse_jvp(out.mask, v, self.W_enc, self.W_dec, self.W_skip)
        # --- dense paths
        if self._use_fused(x):
            if v.ndim == 3:
                p, b, d = v.shape
                out, jv = self._fused(x, v.reshape(p * b, d))
                return out, jv.view(p, b, -1)
            return self._fused(x, v)
        out = self.forward_full(x)
        if v.ndim == 3:
            p, b, d = v.shape
            mask = out.mask.to(self.W_enc.dtype).unsqueeze(0)
            t = (v.reshape(p * b, d) @ self.W_enc).reshape(p, b, -1) * mask
            jv = (t.reshape(p * b, -1) @ self.W_dec).reshape(p, b, -1)
            if self.W_skip is not None:
                jv = jv + (v.reshape(p * b, d) @ self.W_skip).reshape(p, b, -1)
            return out, jv
        return out, self.jvp_from(out, v)

    def jacobian(self, x: Tensor) -> Tensor:
        """Exact Jacobians [batch, d_out, d_in] at inputs [batch, d_in] (closed form; small d only)."""
        x2 = self.check_input(x)
        out = self.forward_full(x2)
        m = out.mask.to(self.W_enc.dtype)
        # J[b] = W_dec^T diag(m[b]) W_enc^T
        jac = torch.einsum("no,bn,in->boi", self.W_dec, m, self.W_enc)
        if self.W_skip is not None:
            jac = jac + self.W_skip.T.unsqueeze(0)
        return jac

    # ------------------------------------------------------------------ decoder norms
    def decoder_norms(self) -> Tensor:
        """``||W_dec[i]||`` for each latent [n_latents]."""
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (for ``decoder_norm == 'unit'``)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out of W_dec's gradient the component along each (unit) decoder row."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g -= (g * w).sum(dim=1, keepdim=True) * w
