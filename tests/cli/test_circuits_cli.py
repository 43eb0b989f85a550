"""``mechfaith circuit`` and ``mechfaith dashboard`` end to end on a tiny random model."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mechfaith.circuits.graph import check_completeness, read_graph
from mechfaith.cli import circuit as circuit_cli
from mechfaith.cli import dashboard as dashboard_cli
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import save_coder
from mechfaith.errors import ConfigError


def _parse(module, argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    module.add_parser(sub)
    return ap.parse_args(argv)


@pytest.fixture(scope="module")
def coders(tmp_path_factory):
    root = tmp_path_factory.mktemp("coders")
    g = torch.Generator().manual_seed(0)
    paths = []
    for layer in (0, 1):
        c = SparseCoder(CoderConfig(d_in=32, n_latents=64, activation="topk", k=8, skip=True), generator=g)
        with torch.no_grad():
            c.W_skip.normal_(0, 0.05, generator=g)
        save_coder(c, root / f"l{layer}", training={"model": "random-gpt2", "layer": layer,
                                                    "input_site": "mlp_in", "output_site": "mlp_out"})
        paths.append(str(root / f"l{layer}"))
    return paths


def test_circuit_cli(coders, tmp_path, capsys):
    out = tmp_path / "c"
    args = _parse(circuit_cli, ["circuit", "--coders", *coders, "--prompt", "hello there, world",
                                "--logit", "top", "--depth", "3", "--beam", "6", "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "error share" in text and "logit[" in text
    g = read_graph(out / "graph.json")
    assert g["paths"] and check_completeness(g) == []
    assert 0.0 <= g["stats"]["graph_error_share"] <= 1.0
    summary = json.loads((out / "circuit.json").read_text())
    assert summary["transcoder_layers"] == [0, 1]
    assert (out / "graph.html").stat().st_size > 1000
    assert len((out / "paths.txt").read_text().splitlines()) == len(g["paths"])
    # a feature root by LAYER:INDEX
    args = _parse(circuit_cli, ["circuit", "--coders", *coders, "--prompt", "abc", "--feature", "1:3",
                                "--out", str(tmp_path / "f")])
    assert args.func(args) == 0
    assert read_graph(tmp_path / "f" / "graph.json")["root"] == "mlp1tc[3]@3"
    args = _parse(circuit_cli, ["circuit", "--coders", *coders, "--prompt", "abc", "--feature", "5:3",
                                "--out", str(tmp_path / "g")])
    with pytest.raises(ConfigError, match="no transcoder|out of range"):
        args.func(args)


def test_dashboard_cli(coders, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(("Some text number %d, with words and more words. " % i) * 40)
    out = tmp_path / "dash"
    args = _parse(dashboard_cli, ["dashboard", "--coders", *coders, "--features", "1:3,0:top2",
                                  "--corpus-source", str(docs), "--context-length", "24", "--contexts", "8",
                                  "--out", str(out)])
    assert args.func(args) == 0
    pages = sorted(p.name for p in out.glob("*.html"))
    assert "index.html" in pages and len(pages) == 4


def test_graph_cli(coders, tmp_path, capsys):
    from mechfaith.circuits.graph_json import read_graph_json
    from mechfaith.cli import graph as graph_cli

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(("Some text number %d, with words and more words. " % i) * 40)
    out = tmp_path / "g"
    argv = ["graph", "--coders", *coders, "--prompt", "hello there, world", "--max-feature-nodes", "40",
            "--check", "5", "--dashboards", "3", "--dashboard-contexts", "4", "--corpus-source", str(docs),
            "--out", str(out), "--quiet"]
    args = _parse(graph_cli, argv)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "replacement score" in text and "Spearman frozen" in text and "frozen_nonlinear" in text
    g = read_graph_json(out / "graph.json")
    assert 0.0 <= g["replacement_score"] <= 1.0 and 0.0 <= g["completeness_score"] <= 1.0
    check = g["meta"]["check"]
    assert len(check["features"]) == 5 and set(check["spearman"]) == {"frozen", "frozen_nonlinear", "live_linear", "live"}
    assert check["spearman"]["frozen"] > 0.9  # the graph's own world (40 of the features: nearly exact)
    np_graph = json.loads((out / "neuronpedia.json").read_text())
    assert {"metadata", "qParams", "nodes", "links"} <= set(np_graph)
    html = (out / "graph.html").read_text()
    dashboards = sorted(p.name for p in (out / "dashboards").glob("feature_*.html"))
    assert 1 <= len(dashboards) <= 3 and f"dashboards/{dashboards[0]}" in html
    # run again into the same folder: replaced whole; a folder of other things is refused
    assert _parse(graph_cli, argv).func(_parse(graph_cli, argv)) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    bad = _parse(graph_cli, [*argv[:-3], "--out", str(tmp_path / "other"), "--quiet"])
    with pytest.raises(ConfigError, match="not an empty folder"):
        bad.func(bad)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="minus"):
        a = _parse(graph_cli, [*argv, "--minus", "3"])
        a.func(a)
    with pytest.raises(ConfigError, match="dashboards"):
        a = _parse(graph_cli, [*argv, "--dashboards", "x"])
        a.func(a)


def test_intervene_cli(coders, tmp_path, capsys):
    from mechfaith.cli import intervene as intervene_cli

    out = tmp_path / "iv.json"
    args = _parse(intervene_cli, ["intervene", "--coders", *coders, "--prompt", "hello there, world",
                                  "--feature", "0:3", "1:5@2*3", "--out", str(out)])
    lin = _parse(intervene_cli, ["intervene", "--coders", *coders, "--prompt", "hi there", "--feature", "0:3",
                                 "--linear", "--world", "frozen"])
    assert lin.func(lin) == 0
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "[frozen]" in text and "[live]" in text
    res = json.loads(out.read_text())
    assert res["interventions"] == ["mlp0tc[3]", "mlp1tc[5]@2*3"]
    assert set(res) >= {"frozen", "live"} and len(res["live"]["logit_changes"]) == 10
    bad = _parse(intervene_cli, ["intervene", "--coders", *coders, "--prompt", "hi", "--feature", "7:1"])
    with pytest.raises(ConfigError, match="no transcoder"):
        bad.func(bad)


def test_graph_case_study_cli(coders, tmp_path):
    from mechfaith.cli import graph as graph_cli

    out = tmp_path / "cs"
    args = _parse(graph_cli, ["graph", "--coders", *coders, "--case-study", "--max-feature-nodes", "10",
                              "--check", "3", "--dashboards", "0", "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    rows = json.loads((out / "case_study.json").read_text())
    assert [r["name"] for r in rows] == list(graph_cli.CASE_STUDY)
    md = (out / "case_study.md").read_text()
    assert md.count("\n## ") == 3 and "| factual |" in md
    for r in rows:
        assert (out / r["name"] / "graph.html").exists() and r["feature_nodes"] == 10
        assert 0.0 <= r["feature_share"] <= 1.0 and len(r["top_features"]) == 5
    both = _parse(graph_cli, ["graph", "--coders", *coders, "--case-study", "--prompt", "x", "--out", str(out)])
    with pytest.raises(ConfigError, match="case-study"):
        both.func(both)


def test_graph_cli_with_a_cross_layer_transcoder(tmp_path, capsys):
    """``mechfaith graph --coders CLT_RUN``: a CLT folder (or run folder holding clt/) gives every block
    layer's transcoder, its cross-layer writes included; dashboards of its features open."""
    from mechfaith.circuits.graph_json import read_graph_json
    from mechfaith.cli import graph as graph_cli
    from mechfaith.coders.clt import CrossLayerTranscoder
    from mechfaith.coders.clt_config import CLTConfig
    from mechfaith.coders.clt_files import save_clt

    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_in=32, n_latents=48, activation="topk", k=6, skip=True),
                               generator=torch.Generator().manual_seed(2))
    save_clt(clt, tmp_path / "run" / "clt", training={"model": "random-gpt2", "layers": [0, 1],
                                                      "input_site": "mlp_in", "output_site": "mlp_out"})
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "d0.txt").write_text("Some text with words and more words. " * 60)
    out = tmp_path / "g"
    argv = ["graph", "--coders", str(tmp_path / "run"), "--prompt", "hello there, world", "--max-feature-nodes",
            "30", "--check", "4", "--dashboards", "2", "--dashboard-contexts", "3", "--corpus-source", str(docs),
            "--out", str(out), "--quiet"]
    args = _parse(graph_cli, argv)
    assert args.func(args) == 0
    g = read_graph_json(out / "graph.json")
    assert g["meta"]["check"]["spearman"]["frozen"] > 0.9
    assert {n["layer"] for n in g["nodes"] if n.get("kind") == "feature"} <= {0, 1}
    assert len(list((out / "dashboards").glob("*.html"))) >= 1
    bad = _parse(graph_cli, [*argv[:2], f"0={tmp_path / 'run'}", *argv[3:-3], "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="cross-layer"):
        bad.func(bad)
