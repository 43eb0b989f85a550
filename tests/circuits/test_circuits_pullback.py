"""Input-independent connections, checked against the input-dependent attribution (which equals them
up to the activation and the measured norm scale) and, through a head, against autograd on the
model's own attention modules."""

from __future__ import annotations

import torch

from mechfaith.circuits.attribution import Attributor
from mechfaith.circuits.pullback import de_embedding, logit_effects, pullback, read_direction, top_k
from mechfaith.circuits.replacement import record_run
from tests.circuits.test_circuits_attribution import SEQ, Reference, make_setup


def test_pullback_and_de_embedding_match_attribution():
    for family in ("gpt2", "llama"):
        lm, tcs, ids = make_setup(family, ("mlp_in", "mlp_in", "mlp_in"))
        run = record_run(lm.model, ids, tcs)
        at = Attributor(run)
        parts = run.parts
        p = SEQ - 1
        later = tcs[2]
        idx = int(run.transcoders[2].f[p].argmax())
        table = at.children([at.feature_probe(2, idx, p)])
        s = float(run.s2[2, p])
        seg = {(sg.kind, sg.layer): sg for sg in table.segments}
        for earlier in tcs[:2]:
            pb = pullback(parts, later, idx, earlier)
            sg = seg[("feature", earlier.layer)]
            got = table.values[0, sg.offset:sg.offset + sg.size]
            want = run.transcoders[earlier.layer].f[p] * pb / s
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        de = de_embedding(parts, later, idx)
        sg = seg[("embed", -1)]
        torch.testing.assert_close(table.values[0, sg.offset], de[ids[p]] / s, rtol=1e-5, atol=1e-9)
        # logit effects against the logit probe's feature children
        tok = 5
        lt = at.children([at.logit_probe(p, tok)])
        sg = {(x.kind, x.layer): x for x in lt.segments}[("feature", 1)]
        eff = torch.stack([logit_effects(parts, tcs[1], i)[tok] for i in range(48)])
        want = run.transcoders[1].f[p] * eff / float(run.s_final[p])
        torch.testing.assert_close(lt.values[0, sg.offset:sg.offset + sg.size], want, rtol=1e-5, atol=1e-9)


def test_de_embedding_through_head_matches_autograd():
    lm, tcs, ids = make_setup("gpt2", ("mlp_in", "mlp_in", "mlp_in"))
    run = record_run(lm.model, ids, tcs)
    ref = Reference(lm, tcs, ids)
    parts = run.parts
    layer, head = 1, 2
    v = read_direction(parts, tcs[2], 4)
    ln1 = lm.adapter.pre_attn_norm(layer)
    x = torch.zeros(parts.d_model, dtype=torch.float64, requires_grad=True)
    z = (x - x.mean()) * ln1.weight  # LN1 with scale 1
    (v @ ref.head_ov(layer, head, z)).backward()
    want = parts.W_E @ x.grad
    got = de_embedding(parts, tcs[2], 4, head=(layer, head))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)


def test_top_k():
    t = top_k(torch.tensor([0.5, -2.0, 3.0, 0.0, 1.0]), 2)
    assert t.top == [(2, 3.0), (4, 1.0)]
    assert t.bottom == [(1, -2.0), (3, 0.0)]
    tab = t.table(lambda i: f"t{i}")
    assert tab["top"][0] == {"index": 2, "value": 3.0, "label": "t2"}
