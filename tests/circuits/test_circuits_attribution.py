"""Attribution in the linearised replacement model, verified by intervention.

The reference below is independent of ``mechfaith.circuits``: it reads the clean activations through
the adapter's hooks and rebuilds every node's value as an affine function of the residual stream with
the model's *own modules* (``c_attn``/``c_proj`` or ``v_proj``/``o_proj``, the norms' weights, the
coder's encoder), with attention patterns and norm scales frozen at their clean values. For every edge
found by the search, removing the child's write from the parent's residual input must change the
parent's value by exactly the edge's attribution; for every expanded node, children + bias sum to
the node's value.
"""

from __future__ import annotations

import math

import pytest
import torch

from mechfaith.circuits.attribution import Attributor
from mechfaith.circuits.graph import build_graph, check_completeness
from mechfaith.circuits.nodes import Node, parse_node
from mechfaith.circuits.replacement import Transcoder, record_run
from mechfaith.circuits.search import SearchConfig, search_paths
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.lm.models import random_model

N_LAYERS = 3
SEQ = 9


def make_setup(family: str, sites: tuple[str, ...], activation: str = "relu", output_sites=None, seed=0):
    lm = random_model(family, n_layers=N_LAYERS, seed=seed)
    lm.model.double()
    with torch.no_grad():  # stronger OV circuits than the default init, so heads matter
        for l in range(N_LAYERS):
            for name, p in lm.adapter.attention(l).named_parameters():
                if "weight" in name:
                    p.mul_(8.0)
    g = torch.Generator().manual_seed(seed + 1)
    tcs = []
    for l, site in enumerate(sites):
        if site is None:
            continue
        c = SparseCoder(CoderConfig(d_in=32, n_latents=48, d_out=32, skip=True, activation=activation, k=12),
                        generator=g).double()
        with torch.no_grad():
            c.W_enc.mul_(3.0)
            c.b_enc.normal_(0, 0.2, generator=g)
            c.W_skip.normal_(0, 0.1, generator=g)
            c.b_dec.normal_(0, 0.1, generator=g)
        out_site = (output_sites or {}).get(l, "mlp_out")
        tcs.append(Transcoder(l, c.eval(), site, out_site))
    ids = torch.randint(2, 101, (SEQ,), generator=g)
    ids[0] = 0
    return lm, tcs, ids


class Reference:
    """Frozen-pattern, frozen-norm-scale reference built from the model's own modules."""

    def __init__(self, lm, tcs, ids):
        self.a = lm.adapter
        self.model = lm.model
        self.tcs = {t.layer: t for t in tcs}
        self.ids = ids
        cap = {}
        a = self.a
        prev = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        hs = []
        for l in range(a.n_layers):
            hs += a.hook_site(l, "resid_pre", lambda t, l=l: cap.__setitem__(("pre", l), t[0]))
            hs += a.hook_site(l, "mlp_out", lambda t, l=l: cap.__setitem__(("mlp", l), t[0]))
            hs.append(a.pre_mlp_norm(l).register_forward_pre_hook(
                lambda m, args, l=l: cap.__setitem__(("mid", l), args[0][0])))
            hs.append(a.attention(l).register_forward_hook(
                lambda m, args, out, l=l: cap.__setitem__(("A", l), out[1][0])))
        hs.append(a.final_norm().register_forward_pre_hook(lambda m, args: cap.__setitem__("final", args[0][0])))
        with torch.no_grad():
            self.logits = a.logits(ids[None])[0]
        for h in hs:
            h.remove()
        self.model.set_attn_implementation(prev)
        self.cap = cap
        n = a.n_layers
        self.n = n

    # residual stream at a stream point
    def resid(self, stream, pos):
        n = self.n
        if stream == 2 * n:
            return self.cap["final"][pos]
        l, half = divmod(stream, 2)
        return self.cap[("mid", l) if half else ("pre", l)][pos]

    def frozen_norm(self, module, x_clean, affine=True):
        """Affine map x -> norm(x) with the scale measured at x_clean."""
        eps = self.a.norm_eps(module)
        rms = self.a.family.norm_kind == "rmsnorm"
        s = torch.sqrt((x_clean.pow(2).mean() if rms else x_clean.var(unbiased=False)) + eps)
        w = module.weight if affine else torch.ones_like(x_clean)
        b = getattr(module, "bias", None) if affine else None

        def f(x):
            z = (x if rms else x - x.mean()) / s * w
            return z + b if b is not None else z
        if affine:
            assert torch.allclose(f(x_clean), module(x_clean[None])[0].to(x_clean.dtype), rtol=1e-5, atol=1e-6)
        return f

    def tc_input(self, layer, pos):
        """(stream, function r -> coder input) of the transcoder at layer."""
        tc = self.tcs[layer]
        if tc.input_site == "resid_pre":
            return 2 * layer, lambda r: r
        x0 = self.resid(2 * layer + 1, pos)
        return 2 * layer + 1, self.frozen_norm(self.a.pre_mlp_norm(layer), x0, affine=tc.input_site == "mlp_in")

    def head_ov(self, layer, head, x):
        """Head's output (no output bias) from LN1 output x [d] at one source position."""
        attn = self.a.attention(layer)
        H = self.model.config.num_attention_heads if self.a.family.name == "llama" else self.model.config.n_head
        d = self.a.d_model
        if self.a.family.name == "gpt2":
            v = attn.c_attn(x[None, None])[0, 0, 2 * d:]
            dh = d // H
            z = torch.zeros(d, dtype=x.dtype)
            z[head * dh:(head + 1) * dh] = v[head * dh:(head + 1) * dh]
            return attn.c_proj(z[None, None])[0, 0] - attn.c_proj.bias
        n_kv = self.model.config.num_key_value_heads
        dh = self.model.config.head_dim
        v = attn.v_proj(x[None])[0]
        kv = head // (H // n_kv)
        z = torch.zeros(H * dh, dtype=x.dtype)
        z[head * dh:(head + 1) * dh] = v[kv * dh:(kv + 1) * dh]
        return attn.o_proj(z[None])[0]

    # phi: (stream, pos, affine function of the residual there)
    def root_phi(self, node: Node):
        if node.kind == "logit":
            x0 = self.resid(2 * self.n, node.pos)
            fn = self.frozen_norm(self.a.final_norm(), x0)
            head = self.a.unembedding()

            def phi(r):
                lg = head(fn(r)[None])[0]
                return lg[node.index] - (lg[node.index2] if node.index2 >= 0 else 0)
            assert torch.allclose(phi(x0), self.logits[node.pos, node.index] -
                                  (self.logits[node.pos, node.index2] if node.index2 >= 0 else 0), atol=1e-8)
            return 2 * self.n, node.pos, phi
        return self.feature_phi(node, 1.0)

    def feature_phi(self, node: Node, scale):
        stream, xin = self.tc_input(node.layer, node.pos)
        coder = self.tcs[node.layer].coder
        return stream, node.pos, lambda r: scale * coder.encode_pre(xin(r)[None])[0, node.index]

    def clean_x_in(self, layer, pos):
        stream, xin = self.tc_input(layer, pos)
        return xin(self.resid(stream, pos))

    def child_phi(self, parent, node: Node):
        ps, pp, phi = parent
        r0 = self.resid(ps, pp)
        lin = lambda delta: phi(r0 + delta) - phi(r0)
        if node.kind == "feature":
            scale = lin(self.tcs[node.layer].coder.W_dec[node.index])
            return self.feature_phi(node, scale)
        if node.kind == "skip":
            stream, xin = self.tc_input(node.layer, node.pos)
            W = self.tcs[node.layer].coder.W_skip
            return stream, node.pos, lambda r: lin(xin(r) @ W)
        if node.kind == "attn":
            l, h, q = node.layer, node.index, node.pos
            A = self.cap[("A", l)][h, pp, q]
            fn = self.frozen_norm(self.a.pre_attn_norm(l), self.resid(2 * l, q))
            return 2 * l, q, lambda r: lin(A * self.head_ov(l, h, fn(r)))
        return None

    def write(self, parent, node: Node):
        """The child's write into the parent's residual input (clean values)."""
        ps, pp, _ = parent
        if node.kind == "feature":
            coder = self.tcs[node.layer].coder
            f = coder.encode(self.clean_x_in(node.layer, node.pos)[None])[0, node.index]
            return f * coder.W_dec[node.index]
        if node.kind == "error":
            coder = self.tcs[node.layer].coder
            return self.cap[("mlp", node.layer)][node.pos] - coder(self.clean_x_in(node.layer, node.pos)[None])[0]
        if node.kind == "skip":
            return self.clean_x_in(node.layer, node.pos) @ self.tcs[node.layer].coder.W_skip
        if node.kind == "mlp":
            return self.cap[("mlp", node.layer)][node.pos]
        if node.kind == "emb":
            return self.a.embedding().weight[self.ids[node.pos]]
        if node.kind == "pos":
            return self.a.positional_embedding().weight[node.pos]
        if node.kind == "attn":
            l, h, q = node.layer, node.index, node.pos
            x1 = self.a.pre_attn_norm(l)(self.resid(2 * l, q)[None])[0]
            return self.cap[("A", l)][h, pp, q] * self.head_ov(l, h, x1)
        raise AssertionError(node)


def check_search(lm, tcs, ids, root: Node, depth=3, beam=8):
    run = record_run(lm.model, ids, tcs)
    at = Attributor(run)
    result = search_paths(at, root, SearchConfig(depth=depth, beam=beam))
    ref = Reference(lm, tcs, ids)
    phis = {0: ref.root_phi(root)}
    scale = abs(result.root_value) + max(abs(o.attribution) for o in result.occurrences)
    n_edges = 0
    kinds = set()
    for o in result.occurrences[1:]:
        parent = phis[o.parent]
        ps, pp, phi = parent
        r0 = ref.resid(ps, pp)
        with torch.no_grad():
            w = ref.write(parent, o.node)
            change = float(phi(r0) - phi(r0 - w))
        assert math.isclose(change, o.attribution, rel_tol=1e-4, abs_tol=1e-6 * scale), \
            (o.name, change, o.attribution)
        n_edges += 1
        kinds.add(o.node.kind)
        child = ref.child_phi(parent, o.node)
        if child is not None:
            phis[o.id] = child
            with torch.no_grad():  # the child's value (as a node) is its attribution
                cs, cp, cphi = child
                assert math.isclose(float(cphi(ref.resid(cs, cp))), o.attribution, rel_tol=1e-4,
                                    abs_tol=1e-6 * scale)
    # completeness of every expanded occurrence
    for o in result.occurrences:
        if o.expanded:
            b = o.breakdown
            assert math.isclose(b["kept"] + b["tc_error"] + b["bias"] + b["pruned"], o.attribution,
                                rel_tol=1e-4, abs_tol=1e-6 * scale)
            assert math.isclose(sum(result.occurrences[c].attribution for c in o.children), b["kept"],
                                rel_tol=1e-6, abs_tol=1e-9 * scale)
    graph = build_graph(result, n_layers=N_LAYERS, tokens=ids.tolist())
    assert check_completeness(graph, rtol=1e-4) == []
    return result, n_edges, kinds, at, ref


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edges_equal_interventions_feature_root(family):
    lm, tcs, ids = make_setup(family, ("mlp_in", "mlp_in_normalized", "mlp_in"))
    # pick an active feature of the last transcoder at the last position
    run = record_run(lm.model, ids, tcs)
    f = run.transcoders[2].f[SEQ - 1]
    idx = int(f.argmax())
    assert f[idx] > 0
    result, n_edges, kinds, at, ref = check_search(lm, tcs, ids, Node("feature", SEQ - 1, 2, idx))
    assert n_edges >= 10
    assert {"feature", "attn"} <= kinds
    assert math.isclose(result.root_value, float(f[idx]), rel_tol=1e-6)  # Llama RMSNorm runs in float32


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edges_equal_interventions_logit_root(family):
    lm, tcs, ids = make_setup(family, ("resid_pre", None, "mlp_in_normalized"), activation="topk")
    result, n_edges, kinds, at, ref = check_search(lm, tcs, ids, Node("logit", SEQ - 1, -1, 7, 9),
                                                   depth=3, beam=10)
    assert n_edges >= 10
    assert abs(result.root_value - float(ref.logits[SEQ - 1, 7] - ref.logits[SEQ - 1, 9])) < 1e-6


def test_centred_output_site_and_every_child_kind():
    lm, tcs, ids = make_setup("gpt2", ("mlp_in", "mlp_in", None), output_sites={1: "mlp_out_centered"})
    run = record_run(lm.model, ids, tcs)
    at = Attributor(run)
    ref = Reference(lm, tcs, ids)
    root = Node("logit", SEQ - 2, -1, 3)
    probe = at.root_probe(root)
    table = at.children([probe])
    assert math.isclose(float(table.total()[0]), at.value(probe), rel_tol=1e-9)
    parent = ref.root_phi(root)
    ps, pp, phi = parent
    r0 = ref.resid(ps, pp)
    # every nonzero child of the logit, checked by removing its write
    nz = table.values[0].nonzero().flatten().tolist()
    seen = set()
    for col in nz:
        node = table.node(0, col)
        seen.add(node.kind)
        with torch.no_grad():
            change = float(phi(r0) - phi(r0 - ref.write(parent, node)))
        assert math.isclose(change, float(table.values[0, col]), rel_tol=1e-4, abs_tol=1e-9), node.name
    assert {"feature", "attn", "error", "skip", "mlp", "emb", "pos"} <= seen


def test_attention_record_reproduces_the_model():
    for family in ("gpt2", "llama"):
        lm, tcs, ids = make_setup(family, ("mlp_in", None, None))
        run = record_run(lm.model, ids, tcs)
        for l in range(N_LAYERS):
            a = run.parts.attn[l]
            out = torch.einsum("hpq,qhe,hed->pd", run.patterns[l], run.values[l][:, a.kv_of_head], a.W_O) + a.b_O
            torch.testing.assert_close(out, run.attn_out[l], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(run.resid[0], run.embed + (run.pos_embed if run.pos_embed is not None else 0))
        assert lm.model.config._attn_implementation == "sdpa"  # restored


def test_node_names_round_trip():
    for n in [Node("feature", 37, 8, 355), Node("attn", 35, 7, 7), Node("skip", 3, 2), Node("error", 4, 1),
              Node("mlp", 0, 5), Node("emb", 2), Node("pos", 2), Node("logit", 9, -1, 464),
              Node("logit", 9, -1, 464, 198)]:
        assert parse_node(n.name) == n
    assert Node("feature", 37, 8, 355).name == "mlp8tc[355]@37"
    assert Node("attn", 35, 7, 7).name == "attn7[7]@35"
    with pytest.raises(Exception):
        parse_node("mlp8[3")
