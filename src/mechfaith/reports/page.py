"""The one HTML page skeleton of every report, and the pieces the pages share.

Every page mechfaith writes is one self-contained file: :func:`html_page` wraps a body in the
same ``<!DOCTYPE html>`` head with :data:`BASE_CSS` (plus a page's own rules); :func:`table_html`
renders a table of escaped cells; :func:`figure_html` embeds a PNG as a ``data:`` URI with a title
and caption; :func:`esc` escapes any value for HTML text or attributes.
"""

from __future__ import annotations

import base64
import html
from typing import Any, Iterable, Sequence

BASE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.4em}h3{font-size:1.05em}"
    "table{border-collapse:collapse;font-size:12px;margin:.5em 0}"
    "td,th{border:1px solid #bbb;padding:3px 6px;text-align:left}th{background:#eee}"
    "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}"
    "figcaption{font-size:13px;color:#444;max-width:900px}"
    "pre{background:#f6f6f6;padding:.5em;font-size:11px;overflow-x:auto;white-space:pre-wrap}"
    "code{background:#f4f4f4}li{margin:.3em 0}"
)


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML text and quoted attributes."""
    return html.escape(str(value))


def html_page(title: str, body: str, *, extra_css: str = "") -> str:
    """A complete page: doctype, UTF-8, ``<title>``, :data:`BASE_CSS` then ``extra_css``, ``body``."""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>\n"
            f"<style>{BASE_CSS}{extra_css}</style></head>\n<body>\n{body}\n</body></html>\n")


def table_html(head: Sequence[Any], rows: Iterable[Sequence[Any]], *, cls: str = "",
               row_heads: bool = False) -> str:
    """A table with one header row; every cell escaped. ``row_heads``: the first cell is a ``<th>``."""
    attr = f" class='{esc(cls)}'" if cls else ""
    out = [f"<table{attr}><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [f"<th>{esc(c)}</th>" if row_heads and i == 0 else f"<td>{esc(c)}</td>" for i, c in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_html(title: str, png: bytes, caption: str) -> str:
    """A ``<figure>``: the title as ``<h3>``, the PNG embedded (alt text = title), the caption."""
    return (f"<figure><h3>{esc(title)}</h3><img alt='{esc(title)}' src='{png_data_uri(png)}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


__all__ = ["BASE_CSS", "esc", "figure_html", "html_page", "png_data_uri", "table_html"]
