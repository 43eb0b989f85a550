"""Rows of an attribution graph: the direct effect of every source node on a batch of targets.

In the prompt's linearised replacement model (attention patterns and norm scales frozen, every
feature activation frozen) a target (a feature's pre-activation or a logit) is an affine function
``g . resid[stream, pos] + const`` (a :class:`~mechfaith.circuits.attribution.Probe`). Its *direct*
effect from a source is that source's write times the gradient of the target with respect to the
residual stream where the source writes, where the gradient flows through the residual stream,
the frozen attention (OV circuits weighted by the recorded patterns, read through the frozen
pre-attention norm) and the transcoders' linear skip connections, but not through MLPs or
features (they are nodes). Sources:

- every active feature ``(layer, pos, i)``: ``f_i W_dec[i] . grad[2 layer + 2, pos]`` (a CLT feature
  also ``f_i W_dec[layer -> t][i] . grad[2 t + 2, pos]`` for every later layer t it writes to);
- one error node per (layer, position): ``error . grad[2 layer + 2, pos]`` with ``error = mlp_out -
  transcoder(x)`` (the whole MLP output for a layer without a transcoder);
- one token node per position: ``(W_E[token] + W_pos[pos]) . grad[0, pos]``.

Biases (``b_O``, ``b_V`` through attention, ``b_dec``, norm offsets, ``b_enc``) are not nodes:
``row sum + bias = target value`` (the bias is kept per row).

:class:`RowEngine` computes the gradient for a batch of B targets with one backward sweep of
explicit matrix products (no autograd, no model call): per layer ``3 B P d^2 + B H P^2 d_head``
multiply-adds for B targets at positions below ``P``, so rows cost the same for every target kind
and the memory is ``B P d`` plus the output rows. Sources are columns ``[active features (layer,
pos, index order), errors (layer-major), tokens]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechfaith.circuits.attribution import Probe
from mechfaith.circuits.parts import Norm
from mechfaith.circuits.replacement import ReplacementRun


@dataclass
class ActiveFeatures:
    """The active features of a recorded run, in (layer, pos, index) order."""

    coords: Tensor  # [A, 3] int64 (layer, pos, index)
    values: Tensor  # [A] activations
    # per transcoder layer: padded per-position tables [seq, kmax] of latent index, activation, column
    pad_index: dict[int, Tensor]
    pad_value: dict[int, Tensor]
    pad_column: dict[int, Tensor]  # column or A + E + T (the dummy column) for padding

    @property
    def count(self) -> int:
        return int(self.coords.shape[0])


def active_features(run: ReplacementRun) -> ActiveFeatures:
    """Every nonzero feature activation of the run, with per-layer padded tables."""
    coords, values = [], []
    dev = run.resid.device
    for l in sorted(run.transcoders):
        f = run.transcoders[l].f
        pos, idx = torch.nonzero(f, as_tuple=True)  # row-major: by position, then index
        coords.append(torch.stack([torch.full_like(pos, l), pos, idx], dim=1))
        values.append(f[pos, idx])
    if coords:
        all_coords = torch.cat(coords).long()
        all_values = torch.cat(values)
    else:
        all_coords = torch.zeros(0, 3, dtype=torch.long, device=dev)
        all_values = torch.zeros(0, dtype=run.resid.dtype, device=dev)
    A = int(all_coords.shape[0])
    dummy = A + run.n_layers * run.seq_len + run.seq_len
    pad_index, pad_value, pad_column = {}, {}, {}
    start = 0
    for block in coords:
        l = int(block[0, 0]) if len(block) else -1
        if l < 0:
            continue
        n = int(block.shape[0])
        pos = block[:, 1]
        counts = torch.bincount(pos, minlength=run.seq_len)
        kmax = max(1, int(counts.max()))
        slot = torch.arange(n, device=pos.device) - torch.cumsum(counts, 0)[pos] + counts[pos]
        table_i = torch.zeros(run.seq_len, kmax, dtype=torch.long, device=dev)
        table_v = torch.zeros(run.seq_len, kmax, dtype=all_values.dtype, device=dev)
        table_c = torch.full((run.seq_len, kmax), dummy, dtype=torch.long, device=dev)
        table_i[pos, slot] = block[:, 2]
        table_v[pos, slot] = all_values[start:start + n]
        table_c[pos, slot] = torch.arange(start, start + n, device=dev)
        pad_index[l], pad_value[l], pad_column[l] = table_i, table_v, table_c
        start += n
    for l in run.transcoders:  # layers with no active feature on the prompt
        if l not in pad_index:
            pad_index[l] = torch.zeros(run.seq_len, 1, dtype=torch.long, device=dev)
            pad_value[l] = torch.zeros(run.seq_len, 1, dtype=all_values.dtype, device=dev)
            pad_column[l] = torch.full((run.seq_len, 1), dummy, dtype=torch.long, device=dev)
    return ActiveFeatures(all_coords, all_values, pad_index, pad_value, pad_column)


class RowEngine:
    """Direct effects of all sources on batches of targets (see the module docstring)."""

    def __init__(self, run: ReplacementRun, active: ActiveFeatures | None = None) -> None:
        self.run = run
        self.parts = run.parts
        self.active = active if active is not None else active_features(run)
        n, seq = run.n_layers, run.seq_len
        self.n_errors = n * seq
        self.n_sources = self.active.count + self.n_errors + seq
        self.errors = torch.stack([run.transcoders[l].error if l in run.transcoders else run.mlp_out[l]
                                   for l in range(n)])  # [n, seq, d]
        emb = run.embed if run.pos_embed is None else run.embed + run.pos_embed
        self.token_writes = emb  # [seq, d]
        self._W_V_heads = [a.W_V[a.kv_of_head] for a in self.parts.attn]  # [H, d, dh] per layer

    def rows(self, probes: list[Probe]) -> Tensor:
        """``[len(probes), n_sources]``: the direct effect of every source on each probe's value."""
        run, parts = self.run, self.parts
        dt, dev = run.resid.dtype, run.resid.device
        B = len(probes)
        stream = torch.tensor([p.stream for p in probes], device=dev)
        pos = torch.tensor([p.pos for p in probes], device=dev)
        vecs = torch.stack([p.vector for p in probes]).to(dev, dt)  # [B, d]
        P = int(pos.max()) + 1
        top = int(stream.max())
        G = torch.zeros(B, P, parts.d_model, dtype=dt, device=dev)
        out = torch.zeros(B, self.n_sources + 1, dtype=dt, device=dev)
        pending: dict[int, Tensor] = {}
        A = self.active.count
        for s in range(top, -1, -1):
            hit = (stream == s).nonzero(as_tuple=True)[0]
            if len(hit):
                G[hit, pos[hit]] += vecs[hit]
            if s in pending:
                G += pending.pop(s)
            if s == 0:
                out[:, A + self.n_errors:A + self.n_errors + P] = (G * self.token_writes[:P]).sum(-1)
                break
            layer, half = divmod(s - 1, 2)
            if half == 0:  # s = 2 layer + 1: the attention of `layer` wrote below this point
                G = G + self._attention_back(layer, G, P)
            else:  # s = 2 layer + 2: the MLP of `layer` wrote below this point
                base = A + layer * run.seq_len
                out[:, base:base + P] = (G * self.errors[layer, :P]).sum(-1)
                if layer in run.transcoders:
                    self._feature_sources(layer, G, P, out)
                    self._skip_back(layer, G, P, pending)
        return out[:, :self.n_sources]

    def _feature_sources(self, layer: int, G: Tensor, P: int, out: Tensor) -> None:
        """Add the direct effects of the features that write to the MLP output of ``layer``: its own,
        and (CLTs) those of earlier layers whose cross decoders reach it."""
        writers = [(layer, self.run.transcoders[layer].W_dec)]
        writers += [(s, rec.cross[layer]) for s, rec in self.run.transcoders.items() if layer in rec.cross]
        for source, W_dec in writers:
            idx = self.active.pad_index[source][:P]  # [P, k]
            vals = torch.einsum("bpd,pkd->bpk", G, W_dec[idx]) * self.active.pad_value[source][:P]
            out.index_add_(1, self.active.pad_column[source][:P].reshape(-1), vals.reshape(G.shape[0], -1))

    def _skip_back(self, layer: int, G: Tensor, P: int, pending: dict[int, Tensor]) -> None:
        rec = self.run.transcoders[layer]
        if rec.W_skip is None:
            return
        g_in = G @ rec.W_skip.T  # [B, P, d_in]
        site = rec.tc.input_site
        if site == "resid_pre":
            target, g = 2 * layer, g_in
        else:
            norm = self.parts.ln2[layer]
            if site == "mlp_in_normalized":  # the norm without its affine part
                norm = Norm(norm.kind, None, None, norm.eps)
            g, target = norm.read_vector(g_in, self.run.s2[layer, :P]), 2 * layer + 1
        pending[target] = pending[target] + g if target in pending else g

    def _attention_back(self, layer: int, G: Tensor, P: int) -> Tensor:
        a = self.parts.attn[layer]
        u = torch.einsum("bpd,hed->bphe", G, a.W_O)  # [B, P, H, dh]
        v = torch.einsum("hpq,bphe->bqhe", self.run.patterns[layer][:, :P, :P], u)
        w = torch.einsum("bqhe,hde->bqd", v, self._W_V_heads[layer])  # [B, P, d]
        return self.parts.ln1[layer].read_vector(w, self.run.s1[layer, :P])
