"""matplotlib for the reports, imported on first use: importing :mod:`mechfaith.reports` never
imports matplotlib, and the Agg backend is chosen when a figure is drawn, not at import."""

from __future__ import annotations

import io
import os
from types import ModuleType
from typing import TYPE_CHECKING

from mechfaith.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` rendered as PNG bytes (tight bounding box); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> None:
    """Render ``fig`` as PNG and write it atomically to ``path``; closes the figure."""
    write_bytes_atomic(path, png_bytes(fig, dpi))


__all__ = ["png_bytes", "pyplot", "save_figure"]
