"""Shared pytest set-up.

- ``tests/`` is on ``sys.path`` (pytest's rootdir conftest), so tests import helpers as
  ``from tests.browser import open_page, require_browser`` (see tests/browser.py for the API).
- Fixture ``browser``: a headless-Chromium :class:`browser.BrowserSession` for one test; the test is
  skipped when Chromium is not installed, and FAILS instead when the environment variable CI is set.
"""

from __future__ import annotations

from typing import Iterator

import pytest


@pytest.fixture()
def browser() -> Iterator["object"]:
    from tests.browser import BrowserSession, require_browser

    require_browser()
    with BrowserSession() as session:
        yield session
