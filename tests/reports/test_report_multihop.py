"""The multi-hop toy report as a person sees it: a tiny run writes every output; the HTML opens in
headless Chromium with every figure loaded and no console errors; the markdown links existing PNGs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mechfaith.reports.multihop_report import write_multihop_outputs
from mechfaith.toy.multihop import MultihopConfig, run_multihop

TINY = dict(steps=60, seeds=2, batch=64, sparsity_coefs=[0.0, 0.03])


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multihop_report")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = run_multihop(MultihopConfig(**TINY), progress=False)
    finally:
        torch.set_num_threads(threads)
    write_multihop_outputs(run, out)
    return out


def test_every_output_is_written(report_dir: Path):
    names = ["metrics.json", "report.html", "report.md", "summary.png", "jacobian_per_layer.png"] + \
        [f"weights_{s}.png" for s in ("per_layer", "clt_lam0", "clt_lam0.03", "clt_jacobian")]
    for name in names:
        path = report_dir / name
        assert path.is_file() and path.stat().st_size > 100, name
    assert (report_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(report_dir.glob(".*.tmp"))


def test_metrics_json_has_the_claims_and_per_seed_numbers(report_dir: Path):
    m = json.loads((report_dir / "metrics.json").read_text())
    assert set(m["claims"]) >= {"clt_writes_later_features_from_earlier_layers", "sparsity_pushes_to_shortcut",
                                "jacobian_matching_removes_the_shortcut", "per_layer_transcoders_use_the_intermediate"}
    for s in m["settings"].values():
        for key in ("cross_layer_share", "intermediate_read_share", "ablation_response", "later_jacobian_rel_error"):
            assert len(s[key]["seeds"]) == 2
    assert m["settings"]["per_layer"]["cross_layer_share"]["mean"] == 0.0  # reach 0: nothing crosses layers


def test_html_is_self_contained_and_markdown_links_pngs(report_dir: Path):
    text = (report_dir / "report.html").read_text()
    srcs = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(srcs) == 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text and "https://" not in text
    md = (report_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(srcs) and all((report_dir / link).is_file() for link in links)


def test_report_opens_in_chromium_with_figures_loaded(report_dir: Path):
    from tests.browser import open_page, require_browser

    require_browser()
    rep = open_page(report_dir / "report.html", selectors=("img", "table tr", "figure", "li.pass, li.fail"),
                    screenshot="multihop_report.png")
    rep.assert_clean()
    assert rep.counts["img"] == 6 and rep.counts["figure"] == 6
    assert rep.images and all(i.loaded and i.natural_width > 100 for i in rep.images)
    assert rep.counts["li.pass, li.fail"] == 7
    assert "multi-hop toy" in rep.text
