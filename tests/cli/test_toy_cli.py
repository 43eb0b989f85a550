"""``mechfaith toy``: a tiny run through the CLI module writes every output and loadable coders."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("mechfaith.cli.dataclass_args", reason="the CLI helper's dataclass_args is not there yet")

from mechfaith.cli import toy  # noqa: E402
from mechfaith.coders.files import load_coder  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser(prog="mechfaith")
    sub = parser.add_subparsers(dest="command")
    toy.add_parser(sub)
    return parser.parse_args(argv)


def test_toy_command_quick_with_overrides(tmp_path, capsys):
    out = tmp_path / "toy"
    args = _parse(["toy", "--out", str(out), "--quick", "--quiet", "--steps", "120", "--d", "5",
                   "--n-latents", "12", "--batch", "64", "--val-samples", "400",
                   "--library-samples", "300"])
    assert args.func(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["steps"] == 120  # flag beats the quick preset
    assert m["config"]["seeds"] == 2  # quick preset beats the built-in default (5)
    for name in ("report.html", "report.md", "scan.png", "jacobian_at_p.png"):
        assert (out / name).is_file()
    coder = load_coder(out / "coders" / "repetition")
    assert coder.d_in == 5 and coder.n_latents == 12
    printed = capsys.readouterr().out
    assert "memorization" in printed and "report.html" in printed


def test_config_file_values_sit_between_preset_and_flags(tmp_path):
    cfg_file = tmp_path / "toy.toml"
    cfg_file.write_text("[toy]\nsteps = 77\nseeds = 3\n")
    args = _parse(["toy", "--quick", "--config", str(cfg_file), "--seeds", "4"])
    cfg = toy.build_config(args)
    assert cfg.steps == 77 and cfg.seeds == 4 and cfg.batch == 256
