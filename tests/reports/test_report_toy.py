"""The toy report as a person sees it: a tiny run writes every output; the HTML opens in headless
Chromium with every figure loaded and no console errors; the markdown links existing PNGs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mechfaith.reports.toy_report import write_toy_outputs
from mechfaith.toy.experiments import ToyConfig, run_toy

TINY = dict(d=5, n_latents=12, steps=150, batch=64, seeds=2, extra_seeds=1, scan_seeds=1,
            scan_repeat_fracs=[0.05, 0.2], scan_sparsity_coefs=[0.1, 0.4], val_samples=500,
            library_samples=400, density=0.3)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_report")
    run = run_toy(ToyConfig(**TINY), progress=False)
    write_toy_outputs(run, out)
    return out


def test_every_output_is_written(report_dir: Path):
    for name in ("metrics.json", "report.html", "report.md", "scan.png", "jacobian_at_p.png",
                 "circuit_map_baseline.png", "circuit_map_repetition.png",
                 "circuit_map_repetition_jacobian.png", "feature_weights_repetition.png",
                 "gradient_masking.png"):
        path = report_dir / name
        assert path.is_file() and path.stat().st_size > 100, name
    assert (report_dir / "scan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(report_dir.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_metrics_json_has_the_promised_keys(report_dir: Path):
    m = json.loads((report_dir / "metrics.json").read_text())
    for name in ("baseline", "repetition", "repetition_jacobian"):
        s = m["settings"][name]
        for key in ("memorization", "memorization_seeds", "val_mse", "l0", "jacobian_error_at_p",
                    "n_datapoint_features"):
            assert key in s, (name, key)
        assert len(s["memorization_seeds"]) == 2
        assert s["memorization"] == pytest.approx(sum(s["memorization_seeds"]) / 2)
    scan = m["scan"]
    assert scan["repeat_frac"] == [0.05, 0.2] and scan["sparsity_coef"] == [0.1, 0.4]
    assert len(scan["memorization"]) == 2 and all(len(r) == 2 for r in scan["memorization"])
    assert set(scan["spearman"]) == {"product", "repeat_frac", "sparsity_coef"}
    assert set(m["claims"]) >= {"baseline_near_zero", "repetition_above_baseline_5x",
                                "jacobian_within_2x_baseline", "scan_product_explains_best"}


def test_html_is_self_contained_and_markdown_links_pngs(report_dir: Path):
    text = (report_dir / "report.html").read_text()
    srcs = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(srcs) >= 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text and "https://" not in text
    md = (report_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(srcs)
    for link in links:
        assert (report_dir / link).is_file()
    assert "| baseline |" in md


def test_report_opens_in_chromium_with_figures_loaded(report_dir: Path):
    from tests.browser import open_page, require_browser

    require_browser()
    rep = open_page(report_dir / "report.html", selectors=("img", "table tr", "figure"),
                    screenshot="toy_report.png")
    rep.assert_clean()
    assert rep.counts["img"] >= 8 and rep.counts["figure"] == rep.counts["img"]
    assert rep.images and all(i.loaded and i.natural_width > 100 for i in rep.images)
    assert rep.counts["table tr"] >= 4
    assert "Toy model of mechanistic" in rep.text
