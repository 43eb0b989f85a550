"""Damaged and foreign coder-set manifests, for the tests of every command that reads a set.

``CORRUPTIONS[name] = (damage, message)``: ``damage(folder)`` changes the set in ``folder`` (a copy of a
good set) and ``message`` is what the one-line error must say.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable


def _text(text: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / "set.json").write_text(text)
    return damage


def _edit(change: Callable[[dict[str, Any], Path], Any]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = json.loads((folder / "set.json").read_text())
        change(data, folder)
        (folder / "set.json").write_text(json.dumps(data))
    return damage


def _outside(data: dict[str, Any], folder: Path) -> None:
    """Layer 1's coder copied beside the set (a valid coder) and the manifest pointing there."""
    shutil.copytree(folder / data["coders"]["1"], folder.parent / "elsewhere")
    data["coders"]["1"] = "../elsewhere"


def _absolute(data: dict[str, Any], folder: Path) -> None:
    data["coders"]["0"] = str((folder / data["coders"]["0"]).resolve())


def _swap(data: dict[str, Any], folder: Path) -> None:
    data["coders"]["0"], data["coders"]["1"] = data["coders"]["1"], data["coders"]["0"]


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "bad json": (_text('{"format": "mechfaith.coder_set", "layers": [0,'), "not valid JSON"),
    "not an object": (_text("[0, 1]"), "not a mechfaith coder set"),
    "nested too deep": (_text("[" * 100_000 + "]" * 100_000), "nested deeper than 64 levels"),
    "foreign format": (_edit(lambda d, f: d.update(format="saelens")), "not a mechfaith coder set"),
    "newer version": (_edit(lambda d, f: d.update(format_version=2)), "format_version 2 is not supported"),
    "missing field": (_edit(lambda d, f: d.pop("model")), "missing field(s) model"),
    "model not text": (_edit(lambda d, f: d.update(model=7)), "field model must be a string"),
    "layers as text": (_edit(lambda d, f: d.update(layers="0,1")), "field layers must be"),
    "layers as booleans": (_edit(lambda d, f: d.update(layers=[False, True])), "field layers must be"),
    "layers unsorted": (_edit(lambda d, f: d.update(layers=[1, 0])), "field layers must be"),
    "coders a list": (_edit(lambda d, f: d.update(coders=list(d["coders"].values()))), "field coders must be"),
    "coders of other layers": (_edit(lambda d, f: d["coders"].update({"2": d["coders"].pop("1")})),
                               "field coders must be"),
    "coder path not text": (_edit(lambda d, f: d["coders"].update({"0": 5})), "field coders['0'] must be"),
    "coder outside the set": (_edit(_outside), "field coders['1'] must be a folder inside the set"),
    "absolute coder path": (_edit(_absolute), "field coders['0'] must be a folder inside the set"),
    "coder missing": (_edit(lambda d, f: d["coders"].update({"1": "layers/L9/coder"})),
                      "layer 1's coder layers/L9/coder does not exist"),
    "coders swapped": (_edit(_swap), "layer 0's coder layers/L1/coder says it replaces layer 1"),
    "runs not a list": (_edit(lambda d, f: d.update(runs={})), "field runs must be"),
    "run of another layer": (_edit(lambda d, f: d["runs"][1].update(layer=0)), "field runs[1] must be"),
    "metric not a number": (_edit(lambda d, f: d["runs"][0]["final_train_metrics"].update(fve="high")),
                            "field runs[0] must be"),
    "seconds not a number": (_edit(lambda d, f: d.update(train_seconds="fast")),
                             "field train_seconds must be a number"),
}


def files_under(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` (relative path -> size; 0 for folders): a command that
    failed must leave this unchanged."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0) for p in sorted(root.rglob("*"))}
