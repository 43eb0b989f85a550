"""The faithfulness HTML page: built from a report on a planted case, self-contained, and clean in
headless Chromium (no console errors, every figure loads)."""

import json

import pytest
import torch

from mechfaith.faithfulness.report import FaithfulnessConfig, faithfulness_report
from mechfaith.reports.faithfulness_report import faithfulness_html, write_faithfulness_html
from tests.browser import open_page, require_browser
from tests.faithfulness.test_faithfulness_instruments import planted_case

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def report():
    ref, coder, x, rep, _ = planted_case(n=800, repeat_frac=0.08)
    with torch.no_grad():  # plant a masking feature too, so every section has something to show
        coder.W_enc[:, 5] *= 30
        coder.W_dec[5] *= 30
        coder.b_enc[5] = -4.5 * float(coder.W_enc[:, 5].norm())
    groups = {"bos": torch.arange(800) < 50, "other": torch.arange(800) >= 50}
    return faithfulness_report(ref, coder, x, groups=groups, other_sets={"shifted": x + 1.0},
                               cfg=FaithfulnessConfig(n_probes=2, spectra_inputs=4, noise_scales=[0.3, 1.0]))


def test_page_has_every_section_and_no_external_resources(report, tmp_path):
    page = faithfulness_html(report, "Planted case")
    for heading in ("Reconstruction and Jacobian agreement", "Jacobian spectra", "Datapoint features",
                    "Off-distribution behaviour", "Gradient-masking signs", "Configuration"):
        assert heading in page
    assert page.count("<img") == 5 and page.count("data:image/png;base64,") == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert report["datapoints"]["flagged"][0]["index"] == 40
    assert [m["index"] for m in report["masking"]["flagged"]] == [5]
    # a partial report (only some sections) renders too
    partial = {k: report[k] for k in ("coder", "jacobian")}
    assert faithfulness_html(partial).count("<img") == 1
    path = tmp_path / "r.html"
    write_faithfulness_html(report, path)
    assert path.read_text(encoding="utf-8") == faithfulness_html(report)
    json.dumps(report, allow_nan=False)


def test_page_opens_cleanly_in_chromium(report, tmp_path):
    require_browser()
    path = tmp_path / "faithfulness.html"
    write_faithfulness_html(report, path, "Planted case")
    seen = open_page(path, selectors=("img", "table tr", "h2"), screenshot="faithfulness_report.png")
    seen.assert_clean()
    assert seen.counts["img"] == 5 and not seen.broken_images
    assert all(im.natural_width > 100 for im in seen.images)
    assert seen.counts["h2"] == 6
    assert "Planted case" in seen.title and "flagged" in seen.text
