"""Test helper: a copy of a committed fixture folder, its cfg.json and weights edited (to break one thing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file


def edited_copy(fixture: Path, dst: Path, weights_name: str, change: Callable[[dict[str, Any]], Any] | None = None,
                tensors: Callable[[dict[str, Any]], Any] | None = None) -> Path:
    """Copy ``fixture`` to ``dst``; ``change`` edits its cfg.json (a dict, in place), ``tensors`` its
    weights file ``weights_name`` (a dict of tensors, in place)."""
    folder = Path(shutil.copytree(fixture, dst))
    if change:
        cfg = json.loads((folder / "cfg.json").read_text())
        change(cfg)
        (folder / "cfg.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(str(folder / weights_name))
        tensors(t)
        save_file(t, str(folder / weights_name))
    return folder
