"""The circuit graph viewer, checked in headless Chromium as a person would see it."""

from __future__ import annotations

from mechfaith.circuits.attribution import Attributor
from mechfaith.circuits.graph import build_graph, read_graph, write_graph
from mechfaith.circuits.nodes import Node
from mechfaith.circuits.replacement import record_run
from mechfaith.circuits.search import SearchConfig, search_paths
from mechfaith.reports.graph_viewer import graph_html, write_graph_html
from tests.circuits.test_circuits_attribution import N_LAYERS, SEQ, make_setup


def small_graph():
    lm, tcs, ids = make_setup("gpt2", ("mlp_in", "mlp_in", "mlp_in"))
    run = record_run(lm.model, ids, tcs, token_strings=[f"t{int(i)}</script>" for i in ids])
    at = Attributor(run)
    idx = int(run.transcoders[2].f[SEQ - 1].argmax())
    res = search_paths(at, Node("feature", SEQ - 1, 2, idx), SearchConfig(depth=3, beam=6))
    return build_graph(res, n_layers=N_LAYERS, tokens=ids.tolist(), token_strings=run.token_strings)


def test_graph_json_round_trip_and_escaping(tmp_path):
    g = small_graph()
    write_graph(tmp_path / "g.json", g)
    back = read_graph(tmp_path / "g.json")
    assert back["root"] == g["root"] and len(back["edges"]) == len(g["edges"])
    page = graph_html(g)
    assert "t" in page and "</script>\"" not in page  # the token text cannot close the script


def test_viewer_renders_in_chromium(tmp_path):
    from tests.browser import BrowserSession, require_browser
    require_browser()
    g = small_graph()
    page = tmp_path / "graph.html"
    write_graph_html(g, page)
    n_nodes = len(g["nodes"])
    n_edges = sum(1 for e in g["edges"])
    with BrowserSession() as br:
        br.load(page, wait_for="svg#graph circle.node")
        assert br.count("svg#graph circle.node") == n_nodes
        assert br.count("svg#graph path.edge") == n_edges
        # hover shows details
        br.execute("document.querySelector('circle.node').dispatchEvent(new Event('mouseenter'))")
        assert "attribution" in br.execute("return document.getElementById('details').textContent")
        # hiding error nodes redraws without them
        br.execute("document.getElementById('show-errors').click()")
        n_err = sum(1 for n in g["nodes"] if n["kind"].startswith("err_"))
        assert n_err > 0
        assert br.count("svg#graph circle.node") == n_nodes - n_err
        br.execute("document.getElementById('show-errors').click()")
        bbox = br.execute("const b = document.getElementById('graph').getBBox(); return [b.width, b.height]")
        assert bbox[0] > 100 and bbox[1] > 100
        shot = br.screenshot("circuit_graph.png")
        errors = [e for e in br.logs() if e.get("level") == "SEVERE"]
    assert errors == [], errors
    assert shot.is_file() and shot.stat().st_size > 1000
