"""Input-independent feature connections: pullbacks, de-embeddings, logit effects, top-k tables.

No prompt is involved, so norm scales are unknown: a feature's *read direction* in the residual
stream is its encoder vector through the norm's weight (and LayerNorm's centring) with the scale
set to 1 (the paper's convention with folded LayerNorm):

- ``pullback(later, earlier_tc)`` = ``W_dec_earlier @ read(later)`` [n_latents_earlier]: the change
  of the later feature's pre-activation per unit activation of each earlier feature;
- ``de_embedding(feature)`` = ``W_E @ read(feature)`` [vocab]: which tokens, embedded, push the
  feature up; ``head=(layer, h)`` first pulls ``read`` back through that head's OV circuit
  (``center(w1 * W_V (W_O read))``), i.e. the tokens that, attended to by the head, push it up;
- ``logit_effects(feature)`` = ``W_U @ (w_f * center(W_dec[i]))`` [vocab]: the feature's direct effect
  on the logits through the final norm (scale 1).

A CLT feature writes to several layers' MLP outputs: its "decoder row" here is the sum of its rows
to every layer below the reader (:func:`writes_before`; all of them for the logits), since those
writes all land in the residual stream before the reader reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from mechfaith.circuits.parts import ModelParts, Norm
from mechfaith.circuits.replacement import Transcoder
from mechfaith.errors import ConfigError


@dataclass
class TopK:
    """The ``k`` largest and smallest entries of a vector."""

    top: list[tuple[int, float]]
    bottom: list[tuple[int, float]]

    def table(self, label: Callable[[int], str] | None = None) -> dict[str, list[dict[str, Any]]]:
        def rows(items: list[tuple[int, float]]) -> list[dict[str, Any]]:
            return [{"index": i, "value": v, **({"label": label(i)} if label else {})} for i, v in items]
        return {"top": rows(self.top), "bottom": rows(self.bottom)}


def top_k(values: Tensor, k: int = 10) -> TopK:
    k = min(k, values.numel())
    t = values.topk(k)
    b = (-values).topk(k)
    return TopK([(int(i), float(v)) for v, i in zip(t.values, t.indices)],
                [(int(i), float(-v)) for v, i in zip(b.values, b.indices)])


def read_direction(parts: ModelParts, tc: Transcoder, index: int) -> Tensor:
    """Residual-stream direction [d_model] of feature ``index`` of ``tc`` (norm scale 1)."""
    if not 0 <= index < tc.coder.n_latents:
        raise ConfigError(f"feature {index} is out of range: layer {tc.layer}'s transcoder has "
                          f"{tc.coder.n_latents} features")
    e = tc.coder.W_enc.detach()[:, index].to(parts.W_E.dtype)
    if tc.input_site == "resid_pre":
        return e
    norm = parts.ln2[tc.layer]
    if tc.input_site == "mlp_in_normalized":
        norm = Norm(norm.kind, None, None, norm.eps)
    return norm.read_vector(e, 1.0)


def head_pullback(parts: ModelParts, layer: int, head: int, v: Tensor) -> Tensor:
    """Pull a residual vector read after ``layer``'s attention back through head ``head``'s OV
    circuit to the residual stream at the source position (LN1 scale 1) [d_model]."""
    if not 0 <= layer < parts.n_layers or not 0 <= head < parts.n_heads:
        raise ConfigError(f"head {layer}.{head} does not exist ({parts.n_layers} layers x {parts.n_heads} heads)")
    a = parts.attn[layer]
    u = a.W_O[head] @ v
    w = a.W_V[int(a.kv_of_head[head])] @ u
    return parts.ln1[layer].read_vector(w, 1.0)


def pullback(parts: ModelParts, later: Transcoder, index: int, earlier: Transcoder,
             head: tuple[int, int] | None = None) -> Tensor:
    """Pullback [n_latents of earlier] of feature ``index`` of ``later`` through ``earlier``'s decoder
    (optionally through one attention head ``(layer, h)`` in between)."""
    if earlier.layer >= later.layer:
        raise ConfigError(f"a pullback goes to an earlier layer: {earlier.layer} is not before {later.layer}")
    v = read_direction(parts, later, index)
    if head is not None:
        v = head_pullback(parts, head[0], head[1], v)
    return writes_before(earlier, later.layer).to(v.dtype) @ v


def writes_before(tc: Transcoder, layer: int | None = None) -> Tensor:
    """[n_latents, d_model]: what one unit of each feature of ``tc`` adds to the residual stream
    before ``layer`` reads it (None: in all), i.e. its own decoder row plus, for a CLT layer, its
    rows to the later layers below ``layer``."""
    w = tc.coder.W_dec.detach()
    for target, cross in tc.cross.items():
        if layer is None or target < layer:
            w = w + cross.detach().to(w.dtype)
    return w


def de_embedding(parts: ModelParts, tc: Transcoder, index: int, head: tuple[int, int] | None = None) -> Tensor:
    """De-embedding [vocab] of a feature (optionally through one attention head's OV circuit)."""
    v = read_direction(parts, tc, index)
    if head is not None:
        if head[0] > tc.layer or (head[0] == tc.layer and tc.input_site == "resid_pre"):
            raise ConfigError(f"head {head[0]}.{head[1]} is not upstream of layer {tc.layer}'s transcoder")
        v = head_pullback(parts, head[0], head[1], v)
    return parts.W_E @ v


def logit_effects(parts: ModelParts, tc: Transcoder, index: int) -> Tensor:
    """Direct effect [vocab] of one unit of feature ``index`` on the logits (final-norm scale 1)."""
    d = writes_before(tc)[index].to(parts.W_E.dtype)
    lnf = parts.ln_final
    z = d - d.mean() if lnf.kind == "layernorm" else d
    if lnf.weight is not None:
        z = z * lnf.weight
    return parts.W_U @ z
