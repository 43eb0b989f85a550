"""Interventions on transcoder features, in the graph's frozen world and in the live model.

Both worlds run the *replacement* model of a recorded prompt: every transcoder layer's MLP output is
``decode(f) + b_dec + skip + error``, the error fixed at its recorded value, so that without an
intervention both reproduce the model's own logits exactly.

- **frozen** (:func:`run_frozen`): attention patterns and norm scales frozen at their recorded
  values (the attribution graph's world), written with explicit matrix products. Features are
  recomputed from their pre-activations with the coder's activation (``features="nonlinear"``), or
  respond linearly on their recorded active set (``"linear"``: what the graph's total effects
  predict exactly), or stay at their recorded values (``"fixed"``: only direct effects; removing a
  source then changes a target by exactly its graph edge). MLPs of layers without a transcoder are
  frozen at their recorded outputs.
- **live** (:func:`run_live`): the real model with forward hooks; attention and norms respond, and
  features are recomputed by their coders (or, ``features="linear"``, respond on their recorded
  active sets, to separate the two nonlinearities).

An intervention (:class:`Intervention`) ablates, scales or sets one feature at one position or at
every position, after the activation function.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from mechfaith.circuits.parts import Norm
from mechfaith.circuits.replacement import ReplacementRun, TranscoderRecord
from mechfaith.errors import ConfigError
from mechfaith.lm.adapters import get_adapter, hooks_removed_after

MODES = ("nonlinear", "linear", "fixed")
_SPEC = re.compile(r"^\s*(?:mlp(\d+)tc\[(\d+)\]|(\d+)\s*:\s*(\d+))\s*(?:@\s*(\d+))?\s*(?:([*=])\s*(\S+))?\s*$")


@dataclass(frozen=True)
class Intervention:
    """Feature ``index`` of ``layer`` at ``pos`` (None: every position) becomes ``0`` (ablate),
    ``factor x`` itself (scale) or ``value`` (set)."""

    layer: int
    index: int
    pos: int | None = None
    mode: str = "ablate"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("ablate", "scale", "set"):
            raise ConfigError(f"intervention mode must be ablate, scale or set, not {self.mode!r}")
        if not torch.isfinite(torch.tensor(self.value)):
            raise ConfigError(f"intervention value must be finite, got {self.value}")

    def apply(self, f: Tensor) -> Tensor:
        """``f`` [..., seq, n_latents] with this intervention applied (a new tensor)."""
        f = f.clone()
        where = (..., slice(None) if self.pos is None else self.pos, self.index)
        if self.mode == "ablate":
            f[where] = 0.0
        elif self.mode == "scale":
            f[where] = f[where] * self.value
        else:
            f[where] = self.value
        return f

    @property
    def name(self) -> str:
        at = "" if self.pos is None else f"@{self.pos}"
        tail = {"ablate": "", "scale": f"*{self.value:g}", "set": f"={self.value:g}"}[self.mode]
        return f"mlp{self.layer}tc[{self.index}]{at}{tail}"


def parse_intervention(spec: str) -> Intervention:
    """``8:355@37`` or ``mlp8tc[355]@37`` (ablate), ``...*2`` (scale), ``...=5`` (set); no ``@``: all positions."""
    m = _SPEC.match(spec)
    if not m:
        raise ConfigError(f"cannot read intervention {spec!r}; expected LAYER:INDEX[@POS][*FACTOR|=VALUE], "
                          f"e.g. 8:355@37, 8:355*2 or mlp8tc[355]@37=0")
    layer, index = (int(m[1]), int(m[2])) if m[1] is not None else (int(m[3]), int(m[4]))
    pos = int(m[5]) if m[5] is not None else None
    if m[6] is None:
        return Intervention(layer, index, pos)
    try:
        value = float(m[7])
    except ValueError:
        raise ConfigError(f"intervention {spec!r}: {m[7]!r} is not a number") from None
    return Intervention(layer, index, pos, "scale" if m[6] == "*" else "set", value)


def check_interventions(run: ReplacementRun, interventions: Sequence[Intervention]) -> None:
    for iv in interventions:
        rec = run.transcoders.get(iv.layer)
        if rec is None:
            raise ConfigError(f"{iv.name}: layer {iv.layer} has no transcoder (have {sorted(run.transcoders)})")
        if not 0 <= iv.index < rec.f.shape[1]:
            raise ConfigError(f"{iv.name}: layer {iv.layer}'s transcoder has {rec.f.shape[1]} features")
        if iv.pos is not None and not 0 <= iv.pos < run.seq_len:
            raise ConfigError(f"{iv.name}: position out of range for a prompt of {run.seq_len} tokens")


@dataclass
class WorldRun:
    """One run of the replacement model: logits and every transcoder's activations."""

    logits: Tensor  # [seq, vocab]
    activations: dict[int, Tensor]  # layer -> [seq, n_latents]
    pre: dict[int, Tensor]  # layer -> [seq, n_latents] pre-activations


def _activate(rec: TranscoderRecord, pre: Tensor, features: str) -> Tensor:
    if features == "fixed":
        return rec.f.clone()
    if features == "linear":
        return pre * (rec.f != 0)
    coder = rec.tc.coder
    with torch.no_grad():
        f, _ = coder.activate(pre.to(coder.W_enc.dtype))
    return f.to(pre.dtype)


def _tc_input(run: ReplacementRun, rec: TranscoderRecord, x_pre: Tensor, x_mid: Tensor) -> Tensor:
    l, site = rec.tc.layer, rec.tc.input_site
    if site == "resid_pre":
        return x_pre
    norm = run.parts.ln2[l] if site == "mlp_in" else Norm(run.parts.ln2[l].kind, None, None, run.parts.ln2[l].eps)
    return norm.apply(x_mid, run.s2[l])


def run_frozen(run: ReplacementRun, interventions: Sequence[Intervention] = (), *, features: str = "nonlinear",
               drop_errors: Iterable[tuple[int, int]] = (), drop_tokens: Iterable[int] = ()) -> WorldRun:
    """The replacement model in the frozen world (see the module docstring). ``drop_errors``
    ((layer, pos) pairs) and ``drop_tokens`` (positions) remove those error or token writes."""
    if features not in MODES:
        raise ConfigError(f"features must be one of {', '.join(MODES)}, not {features!r}")
    check_interventions(run, interventions)
    parts = run.parts
    x = run.embed.clone() if run.pos_embed is None else run.embed + run.pos_embed
    for p in drop_tokens:
        x[p] = 0.0
    dropped: dict[int, list[int]] = {}
    for l, p in drop_errors:
        dropped.setdefault(l, []).append(p)
    acts: dict[int, Tensor] = {}
    pres: dict[int, Tensor] = {}
    for l in range(run.n_layers):
        a = parts.attn[l]
        x1 = parts.ln1[l].apply(x, run.s1[l])
        v = torch.einsum("qd,kde->qke", x1, a.W_V) + a.b_V  # [seq, n_kv, dh]
        heads = torch.einsum("hpq,qhe->phe", run.patterns[l], v[:, a.kv_of_head])  # [seq, H, dh]
        x_mid = x + torch.einsum("phe,hed->pd", heads, a.W_O) + a.b_O
        rec = run.transcoders.get(l)
        if rec is None:
            y = run.mlp_out[l].clone()
            y[dropped.get(l, [])] = 0.0
        else:
            x_in = _tc_input(run, rec, x, x_mid)
            pre = x_in @ rec.W_enc + rec.b_enc
            f = _activate(rec, pre, features)
            for iv in interventions:
                if iv.layer == l:
                    f = iv.apply(f)
            err = rec.error.clone()
            err[dropped.get(l, [])] = 0.0
            y = f @ rec.W_dec + rec.b_dec + err
            if rec.W_skip is not None:
                y = y + x_in @ rec.W_skip
            for s, earlier in run.transcoders.items():  # CLTs: earlier layers' cross writes
                if l in earlier.cross:
                    y = y + acts[s] @ earlier.cross[l]
            acts[l], pres[l] = f, pre
        x = x_mid + y
    logits = parts.ln_final.apply(x, run.s_final) @ parts.W_U.T
    if parts.b_U is not None:
        logits = logits + parts.b_U
    return WorldRun(logits, acts, pres)


def run_live(model: Any, run: ReplacementRun, interventions: Sequence[Intervention] = (), *,
             features: str = "nonlinear") -> WorldRun:
    """The replacement model in the live world (the real model, attention and norms live); features
    recomputed by their coders (``"nonlinear"``) or on their recorded active sets (``"linear"``)."""
    if features not in MODES[:2]:
        raise ConfigError(f"features must be nonlinear or linear in the live world, not {features!r}")
    check_interventions(run, interventions)
    adapter = get_adapter(model)
    acts: dict[int, Tensor] = {}
    pres: dict[int, Tensor] = {}
    with torch.no_grad(), hooks_removed_after() as handles:
        for l, rec in run.transcoders.items():
            slot: dict[str, Tensor] = {}

            def grab(t: Tensor, slot: dict[str, Tensor] = slot) -> None:
                slot["x"] = t

            def replace(y: Tensor, slot: dict[str, Tensor] = slot, rec: TranscoderRecord = rec, l: int = l) -> Tensor:
                coder = rec.tc.coder
                x = slot.pop("x")[0].to(coder.W_enc.dtype)  # [seq, d_in]
                pre = coder.encode_pre(x)
                f = pre * (rec.f != 0).to(pre.device) if features == "linear" else coder.activate(pre)[0]
                for iv in interventions:
                    if iv.layer == l:
                        f = iv.apply(f)
                acts[l], pres[l] = f.to(run.resid.dtype), pre.to(run.resid.dtype)
                out = coder.decode(f, x).to(y.dtype) + rec.error.to(y.device, y.dtype)
                for s, earlier in run.transcoders.items():  # CLTs: earlier layers' cross writes
                    if l in earlier.cross:
                        out = out + (acts[s] @ earlier.cross[l]).to(y.device, y.dtype)
                return out[None]

            handles.extend(adapter.hook_site(l, rec.tc.input_site, grab))
            handles.append(adapter.replace_mlp_out(l, replace))
        logits = adapter.logits(run.tokens[None])[0]
    return WorldRun(logits.to(run.resid.dtype), acts, pres)


def demeaned_logit(logits: Tensor, pos: int, token: int, minus: int = -1) -> float:
    """``logit[token] - mean(logits)`` at ``pos`` (``- logit[minus]`` instead of the mean if given)."""
    row = logits[pos]
    return float(row[token] - (row[minus] if minus >= 0 else row.mean()))
