"""Input-dependent attribution in the linearised replacement model of one prompt.

A :class:`Probe` is an affine function of the residual stream at one stream point and position,
``value = g . resid[stream, pos] + const``. Every node that can be expanded has one:

- a transcoder feature: its pre-activation read through the (frozen-scale) norm and the encoder,
  times a *scale*: the feature's attribution per unit activation (``W_dec[i] . g_parent``; 1 for a
  root), so that child attributions come out in the root's units (input-times-gradient);
- a logit (or logit difference): read through the frozen final norm and the unembedding;
- an attention head at a source position ``q`` (child of a probe at destination ``p``): the head's
  term ``A[h, p, q] (LN1(x_q) W_V + b_V) W_O g``, i.e. the parent's vector pulled back through the
  head's OV circuit, weighted by the frozen pattern, read through the frozen LN1 at ``q``;
- a transcoder's skip connection: the parent's vector pulled back through ``W_skip``.

The residual stream at ``(stream, pos)`` is exactly the sum of the writes upstream of it, so a
probe's value splits exactly into its children (:meth:`Attributor.children`): token and positional
embedding, every head at every source position of every upstream layer, every active feature of
every upstream transcoder at ``pos`` (``f_i W_dec[i] . g``), each transcoder's error and skip term,
opaque MLPs of layers without a transcoder, and one constant (``bias``: the probe's own constant
plus ``b_O`` and ``b_dec`` terms). Heads are handled per head with the parent's vector pulled back
once (``W_O[h] g``, then a dot product with the recorded value vectors), never a
heads x positions x positions x d_model tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechfaith.circuits.nodes import Node
from mechfaith.circuits.parts import Norm
from mechfaith.circuits.replacement import ReplacementRun, TranscoderRecord
from mechfaith.errors import ConfigError


@dataclass
class Probe:
    """``value = vector . resid[stream, pos] + const``."""

    stream: int
    pos: int
    vector: Tensor  # [d_model]
    const: float


@dataclass
class Segment:
    """One block of a :class:`ChildTable` row."""

    kind: str  # attn | feature | misc | embed
    layer: int
    offset: int
    size: int


@dataclass
class ChildTable:
    """The children of P probes: ``values[i]`` [total] plus ``bias[i]``; sums to the probe values."""

    values: Tensor  # [P, total]
    bias: Tensor  # [P]
    segments: list[Segment]
    positions: list[int]  # the probes' positions
    seq_len: int
    n_heads: int
    error_mask: Tensor  # [total] bool: transcoder-error entries

    def node(self, row: int, col: int) -> Node:
        """The node of entry ``col`` of probe ``row``."""
        for seg in self.segments:
            if seg.offset <= col < seg.offset + seg.size:
                j = col - seg.offset
                p = self.positions[row]
                if seg.kind == "attn":
                    return Node("attn", j % self.seq_len, seg.layer, j // self.seq_len)
                if seg.kind == "feature":
                    return Node("feature", p, seg.layer, j)
                if seg.kind == "misc":
                    return Node(("error", "skip", "mlp")[j], p, seg.layer)
                return Node(("emb", "pos")[j], p)
        raise IndexError(col)

    def total(self) -> Tensor:
        """Sum of children plus bias per probe [P] (equals the probes' values)."""
        return self.values.sum(-1) + self.bias


class Attributor:
    """Attribution of probes to their children on one recorded prompt."""

    def __init__(self, run: ReplacementRun) -> None:
        self.run = run
        self.parts = run.parts
        self.n_layers = run.parts.n_layers
        self.dtype = run.resid.dtype
        self._no_affine = [Norm(n.kind, None, None, n.eps) for n in run.parts.ln2]

    # ------------------------------------------------------------------ probes
    def value(self, probe: Probe) -> float:
        return float(probe.vector @ self.run.resid[probe.stream, probe.pos]) + probe.const

    def _tc_read(self, rec: TranscoderRecord, e: Tensor, pos: int) -> tuple[int, Tensor, float]:
        """Reading direction ``e`` [d_in] of a transcoder's input -> (stream, vector, const)."""
        l = rec.tc.layer
        site = rec.tc.input_site
        if site == "resid_pre":
            return 2 * l, e, 0.0
        norm = self.parts.ln2[l] if site == "mlp_in" else self._no_affine[l]
        s = self.run.s2[l, pos]
        return 2 * l + 1, norm.read_vector(e, s), float(norm.read_const(e))

    def feature_probe(self, layer: int, index: int, pos: int, scale: float = 1.0) -> Probe:
        """Probe of ``scale`` x the pre-activation of feature ``index`` of ``layer`` at ``pos``."""
        rec = self._record(layer)
        if not 0 <= index < rec.W_enc.shape[1]:
            raise ConfigError(f"feature {index} is out of range: layer {layer}'s transcoder has "
                              f"{rec.W_enc.shape[1]} features")
        self._check_pos(pos)
        stream, vec, const = self._tc_read(rec, rec.W_enc[:, index], pos)
        return Probe(stream, pos, scale * vec, scale * (const + float(rec.b_enc[index])))

    def logit_probe(self, pos: int, token: int, minus_token: int = -1) -> Probe:
        """Probe of the logit of ``token`` (minus that of ``minus_token``) at ``pos``."""
        self._check_pos(pos)
        W_U, b_U = self.parts.W_U, self.parts.b_U
        for t in (token, minus_token):
            if t >= W_U.shape[0] or t < -1:
                raise ConfigError(f"token {t} is out of range: the vocabulary has {W_U.shape[0]} tokens")
        e = W_U[token] - (W_U[minus_token] if minus_token >= 0 else 0)
        const = float(self.parts.ln_final.read_const(e))
        if b_U is not None:
            const += float(b_U[token] - (b_U[minus_token] if minus_token >= 0 else 0))
        vec = self.parts.ln_final.read_vector(e, self.run.s_final[pos])
        return Probe(2 * self.n_layers, pos, vec, const)

    def root_probe(self, node: Node) -> Probe:
        if node.kind == "feature":
            return self.feature_probe(node.layer, node.index, node.pos)
        if node.kind == "logit":
            return self.logit_probe(node.pos, node.index, node.index2)
        raise ConfigError(f"a circuit starts at a transcoder feature or a logit, not {node.name}")

    def child_probe(self, parent: Probe, child: Node) -> Probe | None:
        """The probe of ``child`` seen from ``parent`` (None for leaves)."""
        g = parent.vector
        if child.kind == "feature":
            rec = self._record(child.layer)
            # the feature's writes that land below the parent's stream: its own layer's, and (CLTs)
            # those of its cross decoders into later layers
            scale = sum((float(W[child.index] @ g) for t, W in [(child.layer, rec.W_dec), *rec.cross.items()]
                         if parent.stream > 2 * t + 1), 0.0)
            return self.feature_probe(child.layer, child.index, child.pos, scale)
        if child.kind == "skip":
            rec = self._record(child.layer)
            assert rec.W_skip is not None
            stream, vec, const = self._tc_read(rec, rec.W_skip @ g, child.pos)
            return Probe(stream, child.pos, vec, const)
        if child.kind == "attn":
            l, h, q, p = child.layer, child.index, child.pos, parent.pos
            a = self.parts.attn[l]
            kv = int(a.kv_of_head[h])
            u = a.W_O[h] @ g  # [d_head]
            w = a.W_V[kv] @ u  # [d_model]
            weight = float(self.run.patterns[l, h, p, q])
            ln1 = self.parts.ln1[l]
            vec = weight * ln1.read_vector(w, self.run.s1[l, q])
            const = weight * (float(u @ a.b_V[kv]) + float(ln1.read_const(w)))
            return Probe(2 * l, q, vec, const)
        return None

    # ------------------------------------------------------------------ children
    def children(self, probes: list[Probe]) -> ChildTable:
        """All children of each probe (batched over probes)."""
        run, parts = self.run, self.parts
        n, seq, H = self.n_layers, run.seq_len, parts.n_heads
        G = torch.stack([p.vector for p in probes]).to(self.dtype)  # [P, d]
        pos = torch.tensor([p.pos for p in probes], device=G.device)
        stream = torch.tensor([p.stream for p in probes], device=G.device)
        P = G.shape[0]
        blocks: list[Tensor] = []
        segments: list[Segment] = []
        err_mask: list[Tensor] = []
        offset = 0
        bias = torch.tensor([p.const for p in probes], dtype=self.dtype, device=G.device)

        def add(kind: str, layer: int, block: Tensor, errors: Tensor | None = None) -> None:
            nonlocal offset
            blocks.append(block)
            segments.append(Segment(kind, layer, offset, block.shape[1]))
            err_mask.append(errors if errors is not None else torch.zeros(block.shape[1], dtype=torch.bool))
            offset += block.shape[1]

        for l in range(n):
            ok = (stream > 2 * l).to(self.dtype)  # [P]
            a = parts.attn[l]
            u = torch.einsum("hed,pd->phe", a.W_O, G)  # [P, H, d_head]
            vh = run.values[l][:, a.kv_of_head]  # [seq, H, d_head]
            s = torch.einsum("qhe,phe->phq", vh, u)  # [P, H, seq]
            pat = run.patterns[l][:, pos, :].permute(1, 0, 2)  # [P, H, seq]
            add("attn", l, (s * pat * ok[:, None, None]).reshape(P, H * seq))
            bias = bias + ok * (G @ a.b_O)
        for l in sorted(run.transcoders):
            rec = run.transcoders[l]
            ok = (stream > 2 * l + 1).to(self.dtype)
            effect = (G @ rec.W_dec.T) * ok[:, None]  # [P, n] per unit activation
            for t, W in rec.cross.items():  # a CLT feature's writes into later layers' MLP outputs
                effect = effect + (G @ W.T) * (stream > 2 * t + 1).to(self.dtype)[:, None]
            add("feature", l, rec.f[pos] * effect)
            bias = bias + ok * (G @ rec.b_dec)
        for l in range(n):
            ok = (stream > 2 * l + 1).to(self.dtype)
            misc = torch.zeros(P, 3, dtype=self.dtype, device=G.device)
            if l in run.transcoders:
                rec = run.transcoders[l]
                misc[:, 0] = (G * rec.error[pos]).sum(-1)
                misc[:, 1] = (G * rec.skip[pos]).sum(-1)
            else:
                misc[:, 2] = (G * run.mlp_out[l][pos]).sum(-1)
            add("misc", l, misc * ok[:, None], torch.tensor([True, False, False]))
        emb = torch.zeros(P, 2, dtype=self.dtype, device=G.device)
        emb[:, 0] = (G * run.embed[pos]).sum(-1)
        if run.pos_embed is not None:
            emb[:, 1] = (G * run.pos_embed[pos]).sum(-1)
        add("embed", -1, emb)
        return ChildTable(torch.cat(blocks, dim=1), bias, segments, [p.pos for p in probes], seq, H,
                          torch.cat(err_mask))

    # ------------------------------------------------------------------ helpers
    def _record(self, layer: int) -> TranscoderRecord:
        rec = self.run.transcoders.get(layer)
        if rec is None:
            raise ConfigError(f"layer {layer} has no transcoder (transcoders at layers "
                              f"{sorted(self.run.transcoders)})")
        return rec

    def _check_pos(self, pos: int) -> None:
        if not 0 <= pos < self.run.seq_len:
            raise ConfigError(f"position {pos} is out of range: the prompt has {self.run.seq_len} tokens")

    def node_info(self, node: Node, parent: Probe | None = None) -> dict:
        """Extra facts about a node on this prompt (activation, token, pattern weight)."""
        info: dict = {}
        run = self.run
        if 0 <= node.pos < run.seq_len:
            info["token_id"] = int(run.tokens[node.pos])
            if run.token_strings is not None:
                info["token"] = run.token_strings[node.pos]
        if node.kind == "feature" and node.layer in run.transcoders:
            info["activation"] = float(run.transcoders[node.layer].f[node.pos, node.index])
        if node.kind == "attn" and parent is not None:
            info["dest"] = parent.pos
            info["pattern"] = float(run.patterns[node.layer, node.index, parent.pos, node.pos])
        return info
