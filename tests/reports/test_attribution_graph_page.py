"""The attribution graph viewer, checked in headless Chromium as a person would use it."""

from __future__ import annotations

import time

import pytest

from mechfaith.circuits.attribution_graph import GraphConfig, build_attribution_graph
from mechfaith.circuits.graph_json import graph_to_json
from mechfaith.circuits.replacement import record_run
from mechfaith.reports.attribution_graph_page import (
    attribution_graph_html,
    summary_line,
    write_attribution_graph_html,
)
from tests.circuits.test_circuits_attribution import make_setup


@pytest.fixture(scope="module")
def graph_json():
    lm, tcs, ids = make_setup("gpt2", ("mlp_in", "resid_pre", "mlp_in_normalized"))
    strings = [f"t{i}" for i in ids.tolist()]
    strings[1] += "</script>"  # a token that must not end the embedded JSON
    run = record_run(lm.model, ids, tcs, token_strings=strings)
    g = build_attribution_graph(run, GraphConfig(max_feature_nodes=0))
    return graph_to_json(g, g.prune(), {"model": "random-gpt2"})


def test_page_embeds_the_graph_safely(graph_json):
    page = attribution_graph_html(graph_json, "Graph <of> t0")
    assert "<title>Graph &lt;of&gt; t0</title>" in page
    assert page.count("</script>") == 3  # the two JSON blocks and the code; the token's is escaped
    assert "t67<\\/script>" in page
    s = summary_line(graph_json)
    assert s.startswith(f"replacement score {graph_json['replacement_score']:.3f}, completeness score "
                        f"{graph_json['completeness_score']:.3f}; {len(graph_json['nodes'])} nodes kept")
    assert f"{len(graph_json['links'])} links; target: 10 logits at position 8" in s


def _click(br, node_id: str) -> None:
    br.execute("Array.from(document.querySelectorAll('circle.node')).find(c => c.dataset.id === arguments[0])"
               ".dispatchEvent(new MouseEvent('click', {bubbles: true}))", node_id)


def _wait_title(br, title: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while br.execute("return document.title") != title:
        assert time.monotonic() < deadline, f"title is {br.execute('return document.title')!r}, not {title!r}"
        time.sleep(0.05)


def test_viewer_in_chromium(graph_json, tmp_path, browser):
    nodes, links = graph_json["nodes"], graph_json["links"]
    features = [n for n in nodes if n["kind"] == "feature"]
    target = features[0]
    (tmp_path / "dashboards").mkdir()
    dash_file = tmp_path / "dashboards" / f"feature_{target['layer']}_{target['feature']}.html"
    dash_file.write_text("<!DOCTYPE html><html><head><title>Dashboard of one feature</title></head>"
                         "<body>dashboard</body></html>", encoding="utf-8")
    page = tmp_path / "graph.html"
    write_attribution_graph_html(graph_json, page, "Attribution graph",
                                 {target["id"]: f"dashboards/{dash_file.name}"})
    br = browser
    br.load(page, wait_for="svg#graph circle.node")
    assert br.count("svg#graph circle.node") == len(nodes)
    first = br.count("svg#graph path.link")  # a big graph starts with its 500 strongest links
    weakest_shown = min(sorted((abs(e["weight"]) for e in links), reverse=True)[:first])
    assert 0 < first <= 500 < len(links) and weakest_shown >= sorted(abs(e["weight"]) for e in links)[-500]
    br.execute("const s = document.getElementById('edge-filter'); s.value = 0; s.dispatchEvent(new Event('input'))")
    assert br.count("svg#graph path.link") == len(links)
    assert br.count("circle.node.has-dashboard") == 1
    labels = br.execute("return Array.from(document.querySelectorAll('svg#graph text.tok')).map(t => t.firstChild.nodeValue)")
    assert labels == [t if len(t) <= 12 else t[:11] + "\u2026" for t in graph_json["token_strings"]]
    assert labels[1] == "t67</script>"
    box = br.execute("const b = document.getElementById('graph').getBoundingClientRect(); return [b.right, b.bottom]")
    assert box[0] <= br.size[0] and box[1] > 300  # the whole graph is in view, next to the details
    shot = br.screenshot("attribution_graph.png")
    assert shot.is_file() and shot.stat().st_size > 1000
    logit_labels = br.execute("return Array.from(document.querySelectorAll('svg#graph text.logit-label'))"
                              ".map(t => t.textContent)")
    assert logit_labels == [n.get("token", f"#{n['token_id']}") for n in nodes if n["kind"] == "logit"]
    assert "t34" in logit_labels and "#68" in logit_labels  # a prompt token's text; an id otherwise
    summary = br.execute("return document.getElementById('summary').textContent")
    assert f"replacement score {graph_json['replacement_score']:.3f}" in summary
    # hover: details of the node and its strongest links
    br.execute("document.querySelector('circle.node.feature').dispatchEvent(new Event('mouseenter'))")
    text = br.execute("return document.getElementById('details').textContent")
    first = next(n for n in nodes if n["kind"] == "feature")
    assert text.startswith(first["id"] + "\nkind: feature\nlayer: ") and "influence: " in text
    assert "activation: " in text and "incoming (" in text and "outgoing (" in text
    # hiding the error nodes hides them and their links
    errors = {n["id"] for n in nodes if n["kind"] == "error"}
    assert errors
    br.execute("document.getElementById('show-errors').click()")
    assert br.count("svg#graph circle.node") == len(nodes) - len(errors)
    assert br.count("svg#graph circle.node.error") == 0
    no_err = [e for e in links if e["source"] not in errors and e["target"] not in errors]
    assert br.count("svg#graph path.link") == len(no_err) < len(links)
    br.execute("document.getElementById('show-errors').click()")
    assert br.count("svg#graph circle.node") == len(nodes)
    # the slider hides the weaker links
    max_w = max(abs(e["weight"]) for e in links)
    br.execute("const s = document.getElementById('edge-filter'); s.value = 20; s.dispatchEvent(new Event('input'))")
    strong = sum(1 for e in links if abs(e["weight"]) >= 0.2 * max_w)
    assert br.count("svg#graph path.link") == strong < len(links)
    assert br.execute("return document.getElementById('link-count').textContent") == str(strong)
    assert br.count("svg#graph circle.node") == len(nodes)  # nodes stay
    severe = [e for e in br.logs() if e.get("level") == "SEVERE"]
    assert severe == [], severe
    # a feature without a dashboard does nothing; the one with a dashboard opens it
    url = br.driver.current_url
    _click(br, features[1]["id"])
    time.sleep(0.3)
    assert br.driver.current_url == url
    _click(br, target["id"])
    _wait_title(br, "Dashboard of one feature")
    assert br.driver.current_url == dash_file.resolve().as_uri()
