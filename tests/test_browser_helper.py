"""The headless-Chromium helper (tests/browser.py) sees what a person would: images, errors, layout."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

import tests.browser as browser
from tests.browser import BrowserSession, open_page, require_browser


def write_png(path: Path, width: int, height: int, rgb: tuple[int, int, int]) -> None:
    """A solid-colour RGB PNG written by hand (no imaging library involved)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" + bytes(rgb) * width
    raw = row * height
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture()
def good_page(tmp_path: Path) -> Path:
    write_png(tmp_path / "dot.png", 7, 5, (0, 0, 255))
    page = tmp_path / "good.html"
    page.write_text("""<!doctype html><html><head><title>Good page</title>
<style>body{margin:0} #red{width:200px;height:100px;background:#ff0000}</style></head>
<body><div id="red"></div><h1>Hello</h1><img id="dot" src="dot.png" alt="dot">
<ul><li>a</li><li>b</li><li>c</li></ul></body></html>""", encoding="utf-8")
    return page


def test_clean_page_with_image(good_page: Path) -> None:
    require_browser()
    rep = open_page(good_page, selectors=("li", "img", "table"), screenshot="browser-helper-good.png")
    assert rep.title == "Good page"
    assert rep.counts == {"li": 3, "img": 1, "table": 0}
    assert len(rep.images) == 1
    assert (rep.images[0].natural_width, rep.images[0].natural_height) == (7, 5)
    assert rep.images[0].loaded and rep.broken_images == []
    assert rep.console_errors == [] and rep.failed_resources == []
    assert "Hello" in rep.text
    rep.assert_clean()
    # The screenshot is a real PNG of the page: its top-left corner is the red box.
    assert rep.screenshot is not None and rep.screenshot.parent == browser.ARTIFACTS
    width, height = png_size(rep.screenshot)
    assert width == 1280 and height >= 100
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(rep.screenshot))  # [h, w, 3 or 4] floats in [0, 1]
    assert pixels[50, 100, 0] > 0.9 and pixels[50, 100, 1] < 0.1 and pixels[50, 100, 2] < 0.1
    assert pixels[50, 400, :3].min() > 0.9  # white beside the box


def test_console_errors_and_failed_loads_are_detected(tmp_path: Path) -> None:
    require_browser()
    page = tmp_path / "bad.html"
    page.write_text("""<!doctype html><html><body><p>x</p>
<img src="missing-image.png">
<script>console.error("deliberate-console-error"); console.warn("only a warning");</script>
<script>not_defined_function();</script>
<script src="missing-script.js"></script>
</body></html>""", encoding="utf-8")
    rep = open_page(page)
    assert any("deliberate-console-error" in m for m in rep.console_errors), rep.log
    assert any("not_defined_function" in m for m in rep.console_errors), rep.log
    assert not any("only a warning" in m for m in rep.console_errors)  # warnings are not errors
    assert any("missing-image.png" in m for m in rep.failed_resources), rep.log
    assert any("missing-script.js" in m for m in rep.failed_resources), rep.log
    assert len(rep.broken_images) == 1 and rep.broken_images[0].endswith("missing-image.png")
    with pytest.raises(AssertionError, match="deliberate-console-error"):
        rep.assert_clean()


def test_session_waits_for_late_elements(tmp_path: Path) -> None:
    require_browser()
    page = tmp_path / "late.html"
    page.write_text("""<!doctype html><html><body><div id="host"></div><script>
setTimeout(() => { for (let i = 0; i < 4; i++) {
  const s = document.createElement('span'); s.className = 'late'; host.appendChild(s); } }, 300);
</script></body></html>""", encoding="utf-8")
    with BrowserSession(width=400, height=300) as br:
        br.load(page)
        assert br.count("span.late") == 0
        br.wait_for("span.late", timeout_s=10)
        assert br.count("span.late") == 4
        assert br.execute("return 6 * 7") == 42
        with pytest.raises(AssertionError, match="no element matches"):
            br.wait_for("table", timeout_s=0.3)
        shot = br.screenshot("browser-helper-late", full_page=False)
        assert png_size(shot) == (400, 300)
        assert br.logs() == []


def test_missing_browser_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    ok, reason = browser.browser_available()
    assert not ok and "no-chromium" in reason and "chromium" in reason
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no-chromium"):
        require_browser()
    with pytest.raises(RuntimeError, match="no-chromium"):
        BrowserSession()


def test_open_page_rejects_a_missing_file(tmp_path: Path) -> None:
    require_browser()
    with pytest.raises(FileNotFoundError, match="no such page"):
        open_page(tmp_path / "nothing.html")


def test_browser_fixture_opens_pages(browser: BrowserSession, good_page: Path) -> None:
    browser.load(good_page)
    assert browser.count("li") == 3
    assert [im.natural_width for im in browser.images()] == [7]
    assert browser.logs() == []

