"""The shared page skeleton (mechfaith.reports.page) and the lazy matplotlib of the reports."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import mechfaith
from mechfaith.reports.page import BASE_CSS, esc, figure_html, html_page, png_data_uri, table_html

REPORTS = Path(mechfaith.__file__).parent / "reports"


def test_html_page_skeleton():
    page = html_page("a <b> & c", "<p>hi</p>", extra_css=".x{color:red}")
    assert page.startswith("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>")
    assert "<title>a &lt;b&gt; &amp; c</title>" in page
    assert f"<style>{BASE_CSS}.x{{color:red}}</style>" in page
    assert page.endswith("<body>\n<p>hi</p>\n</body></html>\n")


def test_table_escapes_cells_and_marks_row_heads():
    t = table_html(["<h>", "v"], [["<a>", 1], ["b", None]])
    assert t == ("<table><tr><th>&lt;h&gt;</th><th>v</th></tr><tr><td>&lt;a&gt;</td><td>1</td></tr>"
                 "<tr><td>b</td><td>None</td></tr></table>")
    t = table_html(["", "x"], [["r1", "0.5"]], cls="scan", row_heads=True)
    assert t == "<table class='scan'><tr><th></th><th>x</th></tr><tr><th>r1</th><td>0.5</td></tr></table>"


def test_figure_embeds_png_bytes():
    png = b"\x89PNG\r\n\x1a\nrest"
    assert png_data_uri(png) == "data:image/png;base64," + base64.b64encode(png).decode()
    fig = figure_html("T'<1>", png, "cap & more")
    assert fig.startswith("<figure><h3>T&#x27;&lt;1&gt;</h3><img alt='T&#x27;&lt;1&gt;' src='data:image/png;base64,")
    assert fig.endswith("<figcaption>cap &amp; more</figcaption></figure>")
    assert esc(3) == "3" and esc("\"'") == "&quot;&#x27;"


def test_importing_the_reports_does_not_import_matplotlib():
    modules = sorted(f"mechfaith.reports.{p.stem}" for p in REPORTS.glob("*.py") if p.stem != "__init__")
    assert {"mechfaith.reports.plots", "mechfaith.reports.faithfulness_report", "mechfaith.reports.page"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n")
    env = {**os.environ, "PYTHONPATH": str(REPORTS.parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_drawn_figure_is_png_on_agg():
    from mechfaith.reports.figures import png_bytes, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    data = png_bytes(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_backend().lower() == "agg" and not plt.get_fignums()
