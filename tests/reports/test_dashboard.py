"""Feature dashboards: the numbers against a direct computation, and the pages in headless Chromium."""

from __future__ import annotations

import torch

from mechfaith.circuits.dashboard_data import collect_activations, feature_dashboards
from mechfaith.circuits.parts import model_parts
from mechfaith.circuits.pullback import de_embedding
from mechfaith.reports.dashboard import write_dashboards
from tests.circuits.test_circuits_attribution import make_setup


def setup():
    lm, tcs, _ = make_setup("gpt2", ("mlp_in", "mlp_in_normalized", "mlp_in"))
    g = torch.Generator().manual_seed(3)
    contexts = torch.randint(2, 101, (12, 16), generator=g)
    contexts[:, 0] = 0
    return lm, {t.layer: t for t in tcs}, contexts


def test_dashboard_numbers():
    lm, tcs, contexts = setup()
    acts = collect_activations(lm.model, tcs[1], contexts, [3, 5], batch_contexts=5)
    # direct: normalised pre-MLP input of layer 1, through the coder
    x = lm.adapter.run_with_cache(contexts, [(1, "mlp_in_normalized")])[(1, "mlp_in_normalized")]
    want = tcs[1].coder.encode(x)[..., [3, 5]].float()
    torch.testing.assert_close(acts, want)
    feats = [(1, 3), (2, 7), (2, 11)]
    ds = feature_dashboards(lm.model, tcs, contexts, feats, lambda t: f"<{t}>", k=5)
    a = collect_activations(lm.model, tcs[2], contexts, [7])[..., 0]
    d = ds[1]
    assert abs(d["density"] - float((a[:, 1:] > 0).double().mean())) < 1e-9
    assert abs(d["max"] - float(a[:, 1:].max())) < 1e-6
    top_band = d["bands"][0]["examples"]
    assert top_band and abs(top_band[0]["max"] - d["max"]) < 1e-6
    assert sum(b["n_tokens"] for b in d["bands"]) == int((a[:, 1:] > 0).sum())
    de = de_embedding(model_parts(lm.model), tcs[2], 7)
    assert d["de_embedding"]["top"][0]["index"] == int(de.argmax())
    assert d["pullback_layer"] == 1 and ds[0]["pullback_layer"] == 0
    assert len(d["pullbacks"]["top"]) == 5
    # no features (a pruned graph that keeps none of positive influence): no dashboards, no error
    assert feature_dashboards(lm.model, tcs, contexts, [], lambda t: f"<{t}>") == []


def test_dashboard_pages_render_in_chromium(tmp_path):
    from tests.browser import open_page, require_browser
    require_browser()
    lm, tcs, contexts = setup()
    ds = feature_dashboards(lm.model, tcs, contexts, [(2, 7), (1, 3)], lambda t: f"<{t}>", k=5)
    paths = write_dashboards(ds, tmp_path)
    idx = open_page(paths[0], selectors=("table.index tr", "a"), screenshot="dashboard_index.png")
    idx.assert_clean()
    assert idx.counts["table.index tr"] == 3 and idx.counts["a"] == 2
    rep = open_page(paths[1], selectors=("svg.hist rect.bar", ".example", ".tok", "table.topk"),
                    screenshot="dashboard_feature.png")
    rep.assert_clean()
    n_ex = sum(len(b["examples"]) for b in ds[0]["bands"])
    assert rep.counts[".example"] == n_ex > 0
    assert rep.counts["svg.hist rect.bar"] == len(ds[0]["histogram"]["counts"])
    assert rep.counts["table.topk"] == 3
    assert "<5>" in rep.text or "<" in rep.text  # tokens are shown as text, not markup
    assert rep.screenshot is not None and rep.screenshot.stat().st_size > 1000
