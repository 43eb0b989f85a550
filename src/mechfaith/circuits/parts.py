"""The linear pieces of a causal LM that circuit analysis needs, in one uniform layout.

For GPT-2 (HF ``Conv1D`` weights are ``[in, out]``) and Llama (``nn.Linear`` weights are
``[out, in]``; grouped-query attention shares K/V heads between query heads), per layer:

- attention OV: ``W_V [n_kv, d_model, d_head]``, ``b_V [n_kv, d_head]``, ``W_O [n_heads, d_head,
  d_model]``, ``b_O [d_model]``, and ``kv_of_head [n_heads]`` (which K/V head a query head reads);
  head ``h``'s output at destination ``p`` is ``sum_q A[h, p, q] (LN1(x_q) W_V[kv(h)] + b_V[kv(h)])
  W_O[h]``. Rotary embeddings act only on Q and K, so with frozen patterns OV is linear.
- the pre-attention and pre-MLP norms (:class:`Norm`), and the final norm;
- token embedding ``W_E [vocab, d_model]``, positional embedding ``W_pos [n_pos, d_model]`` (GPT-2
  only), unembedding ``W_U [vocab, d_model]`` and ``b_U [vocab]`` (or None).

Residual-stream bookkeeping ("stream points"): point ``2l`` is the input of layer ``l`` (before its
attention), ``2l + 1`` is after its attention (the MLP's input side), ``2 n_layers`` is the final
residual (input of the final norm). Attention of layer ``l`` writes between ``2l`` and ``2l + 1``;
the MLP of layer ``l`` between ``2l + 1`` and ``2l + 2``. A writer with index ``w`` (attention:
``2l``, MLP: ``2l + 1``) is upstream of stream point ``s`` iff ``w < s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechfaith.errors import ConfigError
from mechfaith.lm.adapters import ModelAdapter, get_adapter


def attn_writer(layer: int) -> int:
    """Writer index of the attention of ``layer``."""
    return 2 * layer


def mlp_writer(layer: int) -> int:
    """Writer index of the MLP of ``layer``."""
    return 2 * layer + 1


@dataclass
class Norm:
    """A LayerNorm / RMSNorm with its scale frozen to a measured value.

    ``norm(x) = w * (x - mean(x)) / s + b`` (LayerNorm) or ``w * x / s`` (RMSNorm), with ``s`` the
    per-position scale measured on the input (:meth:`scale`). ``weight`` None means no affine.
    """

    kind: str  # "layernorm" or "rmsnorm"
    weight: Tensor | None  # [d_model]
    bias: Tensor | None  # [d_model]
    eps: float

    def scale(self, x: Tensor) -> Tensor:
        """The normalising scale of ``x`` [..., d_model] -> [...] (what freezing holds fixed)."""
        if self.kind == "rmsnorm":
            return torch.sqrt(x.pow(2).mean(-1) + self.eps)
        return torch.sqrt(x.var(-1, unbiased=False) + self.eps)

    def apply(self, x: Tensor, s: Tensor) -> Tensor:
        """The norm of ``x`` [..., d] with frozen scale ``s`` [...]."""
        z = x if self.kind == "rmsnorm" else x - x.mean(-1, keepdim=True)
        z = z / s.unsqueeze(-1)
        if self.weight is not None:
            z = z * self.weight
        if self.bias is not None:
            z = z + self.bias
        return z

    def read_vector(self, e: Tensor, s: Tensor | float) -> Tensor:
        """The residual-space vector ``g`` with ``e . norm(x) = g . x + read_const(e)`` at scale
        ``s`` (``e`` [..., d]; ``s`` a float or a tensor broadcasting against ``e[..., 0]``)."""
        c = e * self.weight if self.weight is not None else e
        if self.kind == "layernorm":
            c = c - c.mean(-1, keepdim=True)
        if isinstance(s, Tensor):
            s = s.unsqueeze(-1)
        return c / s

    def read_const(self, e: Tensor) -> Tensor:
        """The constant part ``e . b`` [...] of reading ``e`` from the norm's output."""
        if self.bias is None:
            return torch.zeros(e.shape[:-1], dtype=e.dtype, device=e.device)
        return e @ self.bias


@dataclass
class AttentionOV:
    """One layer's attention value/output weights (see the module docstring)."""

    W_V: Tensor  # [n_kv, d_model, d_head]
    b_V: Tensor  # [n_kv, d_head]
    W_O: Tensor  # [n_heads, d_head, d_model]
    b_O: Tensor  # [d_model]
    kv_of_head: Tensor  # [n_heads] int64

    @property
    def n_heads(self) -> int:
        return self.W_O.shape[0]


@dataclass
class ModelParts:
    """Everything linear that attribution reads from the model (views of its weights)."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    attn: list[AttentionOV]
    ln1: list[Norm]
    ln2: list[Norm]
    ln_final: Norm
    W_E: Tensor  # [vocab, d_model]
    W_pos: Tensor | None  # [n_positions, d_model]
    W_U: Tensor  # [vocab, d_model]
    b_U: Tensor | None  # [vocab]

    def to(self, dtype: torch.dtype) -> "ModelParts":
        def c(t: Tensor | None) -> Tensor | None:
            return None if t is None else cr(t)

        def cr(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        def cn(n: Norm) -> Norm:
            return Norm(n.kind, c(n.weight), c(n.bias), n.eps)

        return ModelParts(self.family, self.n_layers, self.d_model, self.n_heads,
                          [AttentionOV(cr(a.W_V), cr(a.b_V), cr(a.W_O), cr(a.b_O), a.kv_of_head)
                           for a in self.attn],
                          [cn(n) for n in self.ln1], [cn(n) for n in self.ln2], cn(self.ln_final),
                          cr(self.W_E), c(self.W_pos), cr(self.W_U), c(self.b_U))


def _norm(adapter: ModelAdapter, module: object) -> Norm:
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    return Norm(adapter.family.norm_kind, None if w is None else w.detach(),
                None if b is None else b.detach(), adapter.norm_eps(module))  # type: ignore[arg-type]


def _gpt2_ov(attn: Any, d: int, n_heads: int) -> AttentionOV:
    dh = d // n_heads
    W = attn.c_attn.weight.detach()  # [d, 3d] (Conv1D: in, out)
    b = attn.c_attn.bias.detach()
    W_V = W[:, 2 * d:3 * d].reshape(d, n_heads, dh).permute(1, 0, 2).contiguous()
    b_V = b[2 * d:3 * d].reshape(n_heads, dh)
    W_O = attn.c_proj.weight.detach().reshape(n_heads, dh, d)  # [d(in), d(out)]
    return AttentionOV(W_V, b_V, W_O, attn.c_proj.bias.detach(),
                       torch.arange(n_heads))


def _llama_ov(attn: Any, d: int, n_heads: int, n_kv: int, dh: int) -> AttentionOV:
    Wv = attn.v_proj.weight.detach()  # [n_kv * dh, d]
    W_V = Wv.T.reshape(d, n_kv, dh).permute(1, 0, 2).contiguous()
    bv = getattr(attn.v_proj, "bias", None)
    b_V = (bv.detach().reshape(n_kv, dh) if bv is not None
           else torch.zeros(n_kv, dh, dtype=Wv.dtype, device=Wv.device))
    Wo = attn.o_proj.weight.detach()  # [d, n_heads * dh]
    W_O = Wo.T.reshape(n_heads, dh, d).contiguous()
    bo = getattr(attn.o_proj, "bias", None)
    b_O = bo.detach() if bo is not None else torch.zeros(d, dtype=Wo.dtype, device=Wo.device)
    return AttentionOV(W_V, b_V, W_O, b_O, torch.arange(n_heads) // (n_heads // n_kv))


def model_parts(model: object) -> ModelParts:
    """Extract the linear parts of a GPT-2 or Llama causal LM (weights are shared, not copied)."""
    adapter = get_adapter(model)  # type: ignore[arg-type]
    fam = adapter.family
    if fam.name not in ("gpt2", "llama"):
        raise ConfigError(f"circuit analysis supports causal LMs of the gpt2 and llama families, "
                          f"not {fam.name}")
    unembed = adapter.unembedding()
    if unembed is None:
        raise ConfigError("circuit analysis needs a model with a language-model head")
    cfg = adapter.model.config
    d = adapter.d_model
    n_heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head"))
    attn = []
    for layer in range(adapter.n_layers):
        mod = adapter.attention(layer)
        if fam.name == "gpt2":
            attn.append(_gpt2_ov(mod, d, n_heads))
        else:
            n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
            dh = int(getattr(cfg, "head_dim", None) or d // n_heads)
            attn.append(_llama_ov(mod, d, n_heads, n_kv, dh))
    final = adapter.final_norm()
    pos = adapter.positional_embedding()
    b_U = getattr(unembed, "bias", None)
    return ModelParts(
        family=fam.name, n_layers=adapter.n_layers, d_model=d, n_heads=n_heads, attn=attn,
        ln1=[_norm(adapter, adapter.pre_attn_norm(l)) for l in range(adapter.n_layers)],
        ln2=[_norm(adapter, adapter.pre_mlp_norm(l)) for l in range(adapter.n_layers)],
        ln_final=_norm(adapter, final), W_E=adapter.embedding().weight.detach(),
        W_pos=None if pos is None else pos.weight.detach(), W_U=unembed.weight.detach(),
        b_U=None if b_U is None else b_U.detach())
