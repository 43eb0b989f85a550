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
