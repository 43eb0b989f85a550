"""The local replacement model on one prompt: everything attribution needs, measured in one run.

:func:`record_run` runs the *clean* model once on a prompt and records, per layer: the residual
stream at every stream point (see :mod:`mechfaith.circuits.parts`), the LayerNorm / RMSNorm scales
(frozen from here on), the attention patterns (frozen), the value vectors, the MLP outputs, and for
every layer with a transcoder its feature activations, skip output and reconstruction error
``error = mlp_out - transcoder(input)``. With patterns, norm scales and feature activations held at
these values the model is linear in every write to the residual stream, and the MLP output of a
transcoder layer is exactly ``sum_i f_i W_dec[i] + b_dec + x W_skip + error``.
Layers without a transcoder keep their MLP as one opaque write (node ``mlp{l}@p``).

Cross-layer transcoders (:func:`clt_transcoders`): each block layer of a CLT is one
:class:`Transcoder` (its encoder, activation, own decoder, bias and skip) whose ``cross`` decoders
write its latents to later layers' MLP outputs as well; the error of a layer is then ``mlp_out -
(own reconstruction + every earlier layer's cross writes)``, and everything downstream (graph rows,
the frozen and live worlds) adds the cross writes where they land.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mechfaith.circuits.parts import ModelParts, Norm, model_parts
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.coder import SparseCoder
from mechfaith.errors import ConfigError, InputError
from mechfaith.lm.adapters import ModelAdapter, get_adapter, hooks_removed_after

TC_INPUT_SITES = ("mlp_in", "mlp_in_normalized", "resid_pre")
TC_OUTPUT_SITES = ("mlp_out", "mlp_out_centered")


@dataclass
class Transcoder:
    """A transcoder replacing the MLP of ``layer``, with the sites it was trained on."""

    layer: int
    coder: SparseCoder
    input_site: str = "mlp_in"
    output_site: str = "mlp_out"
    # a CLT layer's decoders to later layers: {model layer: [n_latents, d_model]} (empty otherwise)
    cross: dict[int, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_site not in TC_INPUT_SITES:
            raise ConfigError(f"transcoder of layer {self.layer}: input site {self.input_site!r} is not one "
                              f"of {', '.join(TC_INPUT_SITES)}")
        if self.output_site not in TC_OUTPUT_SITES:
            raise ConfigError(f"transcoder of layer {self.layer}: output site {self.output_site!r} is not "
                              f"one of {', '.join(TC_OUTPUT_SITES)}")

    @property
    def read_stream(self) -> int:
        """The stream point the transcoder reads (2l for resid_pre, else 2l + 1)."""
        return 2 * self.layer if self.input_site == "resid_pre" else 2 * self.layer + 1


@dataclass
class TranscoderRecord:
    """One transcoder layer on the prompt."""

    tc: Transcoder
    x_in: Tensor  # [seq, d_in] transcoder input
    f: Tensor  # [seq, n_latents] activations
    pre: Tensor  # [seq, n_latents] pre-activations
    skip: Tensor  # [seq, d_model] x W_skip (zeros without a skip)
    error: Tensor  # [seq, d_model] mlp_out - transcoder output
    W_enc: Tensor  # [d_in, n_latents] (in the run's dtype)
    b_enc: Tensor  # [n_latents]
    W_dec: Tensor  # [n_latents, d_model]
    b_dec: Tensor  # [d_model]
    W_skip: Tensor | None  # [d_in, d_model]
    cross: dict[int, Tensor] = field(default_factory=dict)  # {later layer: [n_latents, d_model]} (CLTs)


@dataclass
class ReplacementRun:
    """The recorded prompt (all tensors of the dtype given to :func:`record_run`)."""

    parts: ModelParts
    tokens: Tensor  # [seq] int64
    resid: Tensor  # [2 n_layers + 1, seq, d_model] residual stream at every stream point
    s1: Tensor  # [n_layers, seq] pre-attention norm scales
    s2: Tensor  # [n_layers, seq] pre-MLP norm scales
    s_final: Tensor  # [seq] final norm scale
    patterns: Tensor  # [n_layers, n_heads, seq, seq] attention patterns (dest, source)
    values: Tensor  # [n_layers, seq, n_kv, d_head] LN1(x) W_V + b_V
    attn_out: Tensor  # [n_layers, seq, d_model] attention outputs (as the model computed them)
    mlp_out: Tensor  # [n_layers, seq, d_model] MLP outputs
    embed: Tensor  # [seq, d_model] token embeddings
    pos_embed: Tensor | None  # [seq, d_model]
    logits: Tensor  # [seq, vocab]
    transcoders: dict[int, TranscoderRecord] = field(default_factory=dict)
    token_strings: list[str] | None = None

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_layers(self) -> int:
        return self.parts.n_layers

    def feature_activation(self, layer: int, index: int, pos: int) -> float:
        return float(self.transcoders[layer].f[pos, index])

    def error_norms(self) -> dict[int, float]:
        """Relative transcoder error ``||error|| / ||mlp_out||`` per transcoder layer (all tokens)."""
        return {l: float(r.error.norm() / self.mlp_out[l].norm().clamp_min(1e-30))
                for l, r in self.transcoders.items()}


def _attn_impl_eager(model: Any) -> str | None:
    prev = getattr(model.config, "_attn_implementation", None)
    if prev != "eager":
        model.set_attn_implementation("eager")
    return prev


def _check_transcoders(adapter: ModelAdapter, parts: ModelParts,
                       transcoders: Mapping[int, Transcoder] | list[Transcoder]) -> dict[int, Transcoder]:
    """``{layer: transcoder}``, each checked against the model."""
    if isinstance(transcoders, Mapping):
        tcs = {int(k): v for k, v in transcoders.items()}
    else:
        tcs = {t.layer: t for t in transcoders}
    for layer, tc in tcs.items():
        adapter.check_layer(layer)
        if tc.layer != layer:
            raise ConfigError(f"transcoder registered for layer {layer} says it is for layer {tc.layer}")
        if tc.coder.d_out != parts.d_model:
            raise ConfigError(f"transcoder of layer {layer} writes {tc.coder.d_out} dims; the model has "
                              f"d_model {parts.d_model}")
        if tc.output_site == "mlp_out_centered" and parts.family != "gpt2":
            raise ConfigError("a transcoder of centred MLP outputs cannot replace a Llama MLP")
    for layer, tc in tcs.items():
        for target, w in tc.cross.items():
            if target <= layer or target not in tcs:
                raise ConfigError(f"the CLT layer {layer} writes to layer {target}, which is not a later "
                                  f"transcoder layer of this run")
            if tuple(w.shape) != (tc.coder.n_latents, parts.d_model):
                raise ConfigError(f"the CLT decoder from layer {layer} to {target} has shape {tuple(w.shape)}")
    return tcs


def clt_transcoders(clt: CrossLayerTranscoder, input_site: str = "mlp_in",
                    output_site: str = "mlp_out") -> dict[int, Transcoder]:
    """A CLT as one :class:`Transcoder` per block layer (model layer numbers), each with its cross
    decoders (see the module docstring); the coders are frozen copies."""
    out: dict[int, Transcoder] = {}
    first = clt.cfg.first_layer
    with torch.no_grad():
        for s in range(clt.n_layers):
            coder = clt.layer_view(s).eval()
            for p in coder.parameters():
                p.requires_grad_(False)
            cross = {first + t: clt.decoder_to(s, t).detach().clone()
                     for t in range(s + 1, s + clt.cfg.n_targets(s))}
            out[first + s] = Transcoder(first + s, coder, input_site, output_site, cross)
    return out


def _check_tokens(tokens: Tensor | list[int], parts: ModelParts) -> Tensor:
    """The prompt as a 1-D int64 tensor on the model's device, checked against vocab and context."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise InputError(f"record_run takes one prompt; got a batch of {ids.shape[0]}")
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise InputError("tokens must be a non-empty 1-D sequence of token ids")
    vocab = parts.W_E.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"token ids must be in [0, {vocab})")
    if parts.W_pos is not None and ids.numel() > parts.W_pos.shape[0]:
        raise InputError(f"the prompt has {ids.numel()} tokens; the model takes at most {parts.W_pos.shape[0]}")
    return ids.to(parts.W_E.device)


def _capture(adapter: ModelAdapter, ids: Tensor, n: int) -> tuple[dict[tuple[str, int], Tensor], Tensor]:
    """One clean forward pass (eager attention) with hooks: the captured tensors and the logits."""
    cap: dict[tuple[str, int], Tensor] = {}

    def put(key: tuple[str, int]) -> Callable[[Tensor], None]:
        def fn(t: Tensor) -> None:
            cap[key] = t.detach()[0]
        return fn

    final = adapter.final_norm()
    if final is None:
        raise ConfigError(f"{adapter.family.name} has no final norm to hook; attribution needs one")
    model: Any = adapter.model  # a transformers model (typed as a plain nn.Module attribute)
    prev = _attn_impl_eager(model)
    try:
        with torch.no_grad(), hooks_removed_after() as handles:
            for l in range(n):
                handles.extend(adapter.hook_site(l, "resid_pre", put(("resid_pre", l))))
                handles.extend(adapter.hook_site(l, "mlp_out", put(("mlp_out", l))))
                handles.extend(adapter.hook_site(l, "mlp_in", put(("mlp_in", l))))
                handles.append(adapter.pre_mlp_norm(l).register_forward_pre_hook(
                    lambda m, args, l=l: put(("resid_mid", l))(args[0])))

                def attn_hook(m: Any, args: Any, out: Any, l: int = l) -> None:
                    cap[("attn_out", l)] = out[0].detach()[0]
                    if out[1] is None:
                        raise RuntimeError("the attention module returned no pattern (not eager)")
                    cap[("pattern", l)] = out[1].detach()[0]
                handles.append(adapter.attention(l).register_forward_hook(attn_hook))
            handles.append(final.register_forward_pre_hook(
                lambda m, args: put(("final", 0))(args[0])))
            logits = adapter.logits(ids[None])[0]
    finally:
        if prev is not None and prev != "eager":
            model.set_attn_implementation(prev)
    return cap, logits


def _record_transcoder(tc: Transcoder, run: ReplacementRun, c: dict[tuple[str, int], Tensor],
                       dt: torch.dtype) -> TranscoderRecord:
    """The transcoder of ``tc.layer`` on the recorded prompt (its input, activations, error)."""
    layer, coder, parts = tc.layer, tc.coder, run.parts
    if tc.input_site == "mlp_in":
        x_in = c[("mlp_in", layer)]
    elif tc.input_site == "mlp_in_normalized":
        x_in = Norm(parts.ln2[layer].kind, None, None, parts.ln2[layer].eps).apply(
            run.resid[2 * layer + 1], run.s2[layer])
    else:
        x_in = run.resid[2 * layer]
    with torch.no_grad():
        out = coder.forward_full(x_in.to(coder.W_enc.dtype))
        W_skip = coder.W_skip
        skip = (x_in.to(coder.W_enc.dtype) @ W_skip) if W_skip is not None else torch.zeros_like(out.y_hat)
    f = out.f.detach().to(dt)
    pre = out.pre.detach().to(dt)
    active = f != 0
    if not torch.allclose(f[active], pre[active], rtol=1e-5, atol=1e-6):
        raise ConfigError(f"transcoder of layer {layer}: active latents are not equal to their "
                          f"pre-activations (unsupported activation)")
    return TranscoderRecord(
        tc=tc, x_in=x_in, f=f, pre=pre, skip=skip.detach().to(dt),
        error=run.mlp_out[layer] - out.y_hat.detach().to(dt),
        W_enc=coder.W_enc.detach().to(dt), b_enc=coder.b_enc.detach().to(dt),
        W_dec=coder.W_dec.detach().to(dt), b_dec=coder.b_dec.detach().to(dt),
        W_skip=None if coder.W_skip is None else coder.W_skip.detach().to(dt),
        cross={t: w.detach().to(dt) for t, w in tc.cross.items()})


def record_run(model: Any, tokens: Tensor | list[int], transcoders: Mapping[int, Transcoder] | list[Transcoder],
               *, dtype: torch.dtype | None = None, token_strings: list[str] | None = None) -> ReplacementRun:
    """Run the clean model on ``tokens`` ([seq] or [1, seq]) and record the replacement model.

    ``dtype``: compute the recorded quantities in this dtype (default: the model's). The model runs
    in its own dtype; use a float64 model for exact checks.
    """
    adapter: ModelAdapter = get_adapter(model)
    parts = model_parts(adapter)
    tcs = _check_transcoders(adapter, parts, transcoders)
    ids = _check_tokens(tokens, parts)
    n = parts.n_layers
    cap, logits = _capture(adapter, ids, n)
    dt = dtype or parts.W_E.dtype
    parts = parts.to(dt)
    c = {k: v.to(dt) for k, v in cap.items()}
    resid = torch.stack([c[(("resid_pre", l // 2) if l % 2 == 0 else ("resid_mid", l // 2))] if l < 2 * n
                         else c[("final", 0)] for l in range(2 * n + 1)])
    s1 = torch.stack([parts.ln1[l].scale(resid[2 * l]) for l in range(n)])
    s2 = torch.stack([parts.ln2[l].scale(resid[2 * l + 1]) for l in range(n)])
    s_final = parts.ln_final.scale(resid[2 * n])
    values = []
    for l in range(n):
        x1 = parts.ln1[l].apply(resid[2 * l], s1[l])  # [seq, d]
        a = parts.attn[l]
        values.append(torch.einsum("qd,kde->qke", x1, a.W_V) + a.b_V)
    seq = ids.shape[0]
    run = ReplacementRun(
        parts=parts, tokens=ids, resid=resid, s1=s1, s2=s2, s_final=s_final,
        patterns=torch.stack([c[("pattern", l)] for l in range(n)]),
        values=torch.stack(values), attn_out=torch.stack([c[("attn_out", l)] for l in range(n)]),
        mlp_out=torch.stack([c[("mlp_out", l)] for l in range(n)]),
        embed=parts.W_E[ids], pos_embed=None if parts.W_pos is None else parts.W_pos[:seq],
        logits=logits.to(dt), token_strings=token_strings)
    for layer in sorted(tcs):
        run.transcoders[layer] = _record_transcoder(tcs[layer], run, c, dt)
    for rec in run.transcoders.values():  # CLT layers: earlier layers' writes are part of the reconstruction
        for target, w in rec.cross.items():
            tgt = run.transcoders[target]
            tgt.error = tgt.error - rec.f @ w
    return run
