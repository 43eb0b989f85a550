"""Test helper: open a local HTML file in Debian's headless Chromium and report what a person would see.

Used by any test that checks a page mechfaith writes (toy report, dashboards). It drives
``/usr/bin/chromium`` through Debian's ``/usr/bin/chromedriver`` with selenium (the ``dev`` extra),
never downloads a browser or a driver, and reaches no network (file:// pages only; the flags below
switch off Chromium's own background connections).

API (import it as ``from tests.browser import ...`` in a test under ``tests/``; pytest puts the repository on
``sys.path``)::

    require_browser()            # in a test: skip if Chromium is missing, but FAIL when CI is set
    browser_available() -> (bool, reason)

    report = open_page("out/report.html", selectors=("img", "table tr"), screenshot="report.png")
    report.console_errors        # list[str]: console.error(...) calls and uncaught JS exceptions
    report.failed_resources      # list[str]: resources that failed to load (missing image, script...)
    report.counts["img"]         # number of elements matching a CSS selector
    report.images                # list[ImageInfo(src, natural_width, natural_height, loaded)]
    report.broken_images         # src of every <img> with naturalWidth == 0
    report.title, report.text    # document title and visible text (document.body.innerText)
    report.screenshot            # Path of the PNG in test-artifacts/ (or None)
    report.problems()            # every console error, failed load and broken image, one per line
    report.assert_clean()        # AssertionError listing those problems, if any

    with BrowserSession() as br:  # several pages or interactions in one browser
        br.load(path, wait_for="svg")       # waits for the load event (and optionally a selector)
        br.count("svg path"); br.images(); br.execute("return 1 + 1")
        br.logs()                           # browser log entries since the last call
        br.screenshot("name.png", full_page=True)

The ``browser`` pytest fixture (tests/conftest.py) yields a ``BrowserSession`` and does the
``require_browser()`` check.

Screenshots land in ``<repo>/test-artifacts/`` (git-ignored); look at them to check a page by eye.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

CHROMIUM = Path(os.environ.get("MECHFAITH_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("MECHFAITH_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def in_ci() -> bool:
    """True when the environment variable CI is set to a true value (as CI runners do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def browser_available() -> tuple[bool, str]:
    """Whether Chromium, ChromeDriver and selenium are all there, and if not, what is missing."""
    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    if not (CHROMEDRIVER.is_file() and os.access(CHROMEDRIVER, os.X_OK)):
        missing.append(f"{CHROMEDRIVER} (Debian package chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        return False, "browser tests need " + ", ".join(missing) + "; run scripts/install.sh"
    return True, ""


def require_browser() -> None:
    """Skip the calling test if the browser is missing; fail it instead when CI is set."""
    import pytest

    ok, reason = browser_available()
    if ok:
        return
    if in_ci():
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class ImageInfo:
    """One ``<img>`` element after the page loaded."""

    src: str
    natural_width: int
    natural_height: int
    loaded: bool  # complete and naturalWidth > 0


@dataclass
class PageReport:
    """What :func:`open_page` saw on a page."""

    url: str
    title: str
    text: str
    console_errors: list[str]
    failed_resources: list[str]
    counts: dict[str, int]
    images: list[ImageInfo]
    screenshot: Path | None
    log: list[dict[str, Any]] = field(default_factory=list)  # every browser log entry

    @property
    def broken_images(self) -> list[str]:
        return [im.src for im in self.images if not im.loaded]

    def problems(self) -> list[str]:
        out = [f"console error: {m}" for m in self.console_errors]
        out += [f"failed to load: {m}" for m in self.failed_resources]
        out += [f"broken image: {s}" for s in self.broken_images
                if not any(s in m for m in self.failed_resources)]
        return out

    def assert_clean(self) -> None:
        problems = self.problems()
        if problems:
            raise AssertionError(f"{self.url} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def _to_url(page: str | os.PathLike[str]) -> str:
    s = str(page)
    if s.startswith(("file://", "data:", "about:", "http://127.0.0.1", "http://localhost")):
        return s
    path = Path(s).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such page: {path}")
    return path.as_uri()


class BrowserSession:
    """One headless Chromium (fresh profile) driven by selenium; use it as a context manager."""

    def __init__(self, width: int = 1280, height: int = 900, timeout_s: float = 30.0) -> None:
        ok, reason = browser_available()
        if not ok:
            raise RuntimeError(reason)
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        # Selenium Manager must never try to download a driver or a browser.
        os.environ.setdefault("SE_OFFLINE", "true")
        self._profile = tempfile.mkdtemp(prefix="mechfaith-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={self._profile}")
        opts.add_argument(f"--window-size={width},{height}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.timeout_s = timeout_s
        try:
            self.driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
        except Exception:
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(timeout_s)
        self.driver.set_script_timeout(timeout_s)
        self.size = (width, height)
        self._set_viewport(width, height)

    def _set_viewport(self, width: int, height: int) -> None:
        """An exact CSS-pixel viewport (a headless window's own size is only approximate)."""
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # -------------------------------------------------------------- life cycle
    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "BrowserSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- pages
    def load(self, page: str | os.PathLike[str], wait_for: str | None = None) -> str:
        """Open a local file (or file:// URL) and wait for its load event (and ``wait_for``)."""
        url = _to_url(page)
        self.driver.get(url)
        if wait_for is not None:
            self.wait_for(wait_for)
        return url

    def wait_for(self, selector: str, timeout_s: float | None = None) -> None:
        """Wait until at least one element matches ``selector`` (AssertionError on timeout)."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while self.count(selector) == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"no element matches {selector!r} after {timeout_s or self.timeout_s}s")
            time.sleep(0.05)

    def execute(self, script: str, *args: Any) -> Any:
        """Run JavaScript in the page (``return`` a value to get it back)."""
        return self.driver.execute_script(script, *args)

    def count(self, selector: str) -> int:
        return int(self.execute("return document.querySelectorAll(arguments[0]).length", selector))

    def images(self) -> list[ImageInfo]:
        rows = self.execute(
            "return Array.from(document.images).map(i => "
            "[i.currentSrc || i.src, i.naturalWidth, i.naturalHeight, i.complete && i.naturalWidth > 0])")
        return [ImageInfo(str(s), int(w), int(h), bool(ok)) for s, w, h, ok in rows]

    def logs(self) -> list[dict[str, Any]]:
        """Browser log entries (level, source, message) since the last call."""
        return list(self.driver.get_log("browser"))

    def screenshot(self, name: str, full_page: bool = True) -> Path:
        """Save a PNG into test-artifacts/ (the whole page height when ``full_page``)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        if not path.suffix:
            path = path.with_suffix(".png")
        width, height = self.size
        if full_page:
            doc_h = int(self.execute(
                "return Math.max(document.documentElement.scrollHeight, document.body ? "
                "document.body.scrollHeight : 0)") or height)
            self._set_viewport(width, min(max(doc_h, height), 12000))
        try:
            if not self.driver.save_screenshot(str(path)):
                raise AssertionError(f"could not save a screenshot to {path}")
        finally:
            if full_page:
                self._set_viewport(width, height)
        return path


def split_log(entries: Iterable[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(console errors, failed resource loads) among browser log entries."""
    errors, failed = [], []
    for e in entries:
        if e.get("level") != "SEVERE":
            continue
        msg = str(e.get("message", ""))
        if e.get("source") == "network":
            failed.append(msg)
        else:
            errors.append(msg)
    return errors, failed


def open_page(page: str | os.PathLike[str], *, selectors: Iterable[str] = (),
              screenshot: str | None = None, wait_for: str | None = None, settle_s: float = 0.0,
              width: int = 1280, height: int = 900) -> PageReport:
    """Open ``page`` in a fresh headless Chromium and report errors, counts, images, a screenshot.

    ``screenshot`` is a file name inside test-artifacts/ (None: no screenshot). ``settle_s`` waits a
    little after the load event for pages that draw from timers.
    """
    url = _to_url(page)  # a missing file fails before a browser starts
    with BrowserSession(width=width, height=height) as br:
        br.load(url, wait_for=wait_for)
        if settle_s:
            time.sleep(settle_s)
        counts = {sel: br.count(sel) for sel in selectors}
        images = br.images()
        title = str(br.execute("return document.title") or "")
        text = str(br.execute("return document.body ? document.body.innerText : ''") or "")
        shot = br.screenshot(screenshot) if screenshot else None
        log = br.logs()
    errors, failed = split_log(log)
    return PageReport(url=url, title=title, text=text, console_errors=errors, failed_resources=failed,
                      counts=counts, images=images, screenshot=shot, log=log)


if __name__ == "__main__":  # python tests/browser.py PAGE.html: a quick look from the shell
    import sys

    rep = open_page(sys.argv[1], selectors=sys.argv[2:], screenshot="manual.png")
    print(json.dumps({"title": rep.title, "counts": rep.counts, "problems": rep.problems(),
                      "screenshot": str(rep.screenshot)}, indent=2))
