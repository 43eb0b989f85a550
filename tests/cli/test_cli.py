"""The ``mechfaith`` command line: help, version, config layering, train, inspect, and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from mechfaith import __version__
from mechfaith.cli import inspect_cmd
from mechfaith.cli.dataclass_args import add_dataclass_args, dataclass_from_args, load_config_file
from mechfaith.cli.main import COMMAND_MODULES, _sub_parsers, build_parser, main
from mechfaith.coders import CoderConfig, build_coder
from mechfaith.coders.files import load_coder, save_coder
from mechfaith.configs import doc
from mechfaith.errors import ConfigError

# --------------------------------------------------------------------------- parser and help


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mechfaith {__version__}"


def test_help_lists_every_command_and_every_help_renders(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "inspect", "toy"):
        assert f"    {name} " in out, out
    parser = build_parser()
    subs = _sub_parsers(parser)
    assert len(subs) >= len(COMMAND_MODULES)
    for p in subs:  # a stray '%' or a bad default in any help text raises here
        text = p.format_help()
        assert text.startswith("usage: mechfaith ")
        assert "--verbose" in text and "--help" in text
        # each option states its default once (dataclass options default to None in argparse)
        assert re.search(r"\(default: [^)]*\)\s+\(default:", text) is None, p.prog


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: mechfaith" in capsys.readouterr().err


def test_unknown_option_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "x", "--no-such-option"])
    assert exc.value.code == 2
    err = capsys.readouterr().err  # one line, no usage block (issue 15)
    assert err == "mechfaith: error: inspect: unrecognized arguments: --no-such-option\n"


def test_verbose_and_quiet_are_accepted_before_and_after_the_command(tmp_path: Path) -> None:
    parser = build_parser()
    a = parser.parse_args(["-v", "-q", "train", "-v", "--out", str(tmp_path)])
    assert a.verbose == 1 and a.verbose_sub == 1 and a.quiet_all is True
    b = parser.parse_args(["train", "--quiet"])
    assert b.quiet is True and b.quiet_all is False


# --------------------------------------------------------------------------- dataclass options


@dataclass
class Demo:
    width: int = doc("Width.")
    rate: float = doc("A rate.", 0.5)
    name: str = doc("A name.", "a", choices=("a", "b"))
    flag: bool = doc("A flag.", False)
    limit: Optional[int] = doc("A limit or None.", None)
    sizes: list = doc("Sizes.", default_factory=lambda: [1, 2])
    extra: dict = doc("Config-file only.", default_factory=dict)


def _demo_parser():
    import argparse

    p = argparse.ArgumentParser(prog="demo")
    add_dataclass_args(p, Demo, prefix="d-", exclude={"sizes"})
    return p


def test_dataclass_options_help_and_layering() -> None:
    p = _demo_parser()
    help_text = p.format_help()
    assert "--d-width INT" in help_text and "(required)" in help_text
    assert "--d-name {a,b}" in help_text and "(default: 0.5)" in help_text
    assert "--d-flag, --no-d-flag" in help_text
    assert "--d-sizes" not in help_text and "--d-extra" not in help_text  # excluded / file-only
    # built-in defaults < file < command line
    cfg = dataclass_from_args(Demo, p.parse_args(["--d-width", "3"]), prefix="d-")
    assert (cfg.width, cfg.rate, cfg.name, cfg.flag, cfg.limit) == (3, 0.5, "a", False, None)
    file_values = {"width": 4, "rate": 0.25, "flag": True, "extra": {"k": 1}, "sizes": [5]}
    cfg = dataclass_from_args(Demo, p.parse_args([]), prefix="d-", file_values=file_values)
    assert (cfg.width, cfg.rate, cfg.flag, cfg.extra, cfg.sizes) == (4, 0.25, True, {"k": 1}, [5])
    args = p.parse_args(["--d-rate", "2e-3", "--no-d-flag", "--d-name", "b", "--d-limit", "7"])
    cfg = dataclass_from_args(Demo, args, prefix="d-", file_values=file_values)
    assert (cfg.width, cfg.rate, cfg.flag, cfg.name, cfg.limit) == (4, 2e-3, False, "b", 7)
    cfg = dataclass_from_args(Demo, p.parse_args(["--d-limit", "none"]), prefix="d-",
                              file_values={"width": 1, "limit": 3})
    assert cfg.limit is None


def test_dataclass_options_reject_bad_values() -> None:
    p = _demo_parser()
    with pytest.raises(ConfigError, match=r"Demo.width: 'abc' is not a valid int"):
        dataclass_from_args(Demo, p.parse_args(["--d-width", "abc"]), prefix="d-")
    with pytest.raises(ConfigError, match=r"missing required option\(s\) --d-width"):
        dataclass_from_args(Demo, p.parse_args([]), prefix="d-")
    with pytest.raises(ConfigError, match="unknown option 'widht'"):
        dataclass_from_args(Demo, p.parse_args([]), prefix="d-", file_values={"widht": 3})
    with pytest.raises(ConfigError, match="not one of a, b"):
        dataclass_from_args(Demo, p.parse_args([]), prefix="d-", file_values={"width": 1, "name": "c"})
    with pytest.raises(SystemExit):  # argparse checks choices itself
        p.parse_args(["--d-name", "c"])


def test_load_config_file_formats_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[train]\nlr = 0.1\nn_steps = 5\n[coder]\nskip = true\n')
    (tmp_path / "a.yaml").write_text("train:\n  lr: 0.1\n  n_steps: 5\ncoder:\n  skip: true\n")
    (tmp_path / "a.json").write_text('{"train": {"lr": 0.1, "n_steps": 5}, "coder": {"skip": true}}')
    want = {"train": {"lr": 0.1, "n_steps": 5}, "coder": {"skip": True}}
    for name in ("a.toml", "a.yaml", "a.json"):
        assert load_config_file(tmp_path / name) == want
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(tmp_path / "empty.yaml") == {}
    (tmp_path / "bad.toml").write_text("[train\nlr = ")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "a.ini").write_text("[x]\n")
    cases = {"bad.toml": "not a valid TOML file", "bad.yaml": "not a valid YAML file",
             "list.yaml": "expected a mapping", "a.ini": "unknown config file type",
             "missing.toml": "config file not found"}
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message) as exc:
            load_config_file(tmp_path / name)
        assert "\n" not in str(exc.value) and name in str(exc.value)


# --------------------------------------------------------------------------- train and inspect


def test_train_demo_writes_a_coder_and_metrics_with_file_and_flag_layering(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[coder]\nd_in = 6\nn_latents = 24\nk = 3\n[train]\nn_steps = 1000\nlog_every = 20\n"
                   "lr_warmup_steps = 0\n")
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    code = main(["train", "--config", str(cfg), "--out", str(out), "--n-steps", "60", "--quiet"])
    assert code == 0
    assert torch.get_num_threads() == threads  # the demo's one-thread setting does not leak
    assert "trained 60 steps" in capsys.readouterr().out
    coder = load_coder(out / "coder")
    assert (coder.cfg.d_in, coder.cfg.n_latents, coder.cfg.k) == (6, 24, 3)  # from the file
    summary = json.loads((out / "train.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 60  # the flag beat the file
    assert summary["train_config"]["log_every"] == 20
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    fves = [row["fve"] for row in lines if "fve" in row]
    assert len(fves) >= 3 and fves[-1] > fves[0]  # it learned something
    meta = json.loads((out / "coder" / "config.json").read_text())
    assert meta["training"]["steps"] == 60


def test_train_rejects_unknown_config_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("coder:\n  d_in: 4\ntrainer:\n  lr: 0.1\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mechfaith: error: ") and "unknown section(s) trainer" in err
    assert not (tmp_path / "x").exists()


def _saved_coder(tmp_path: Path) -> tuple[Path, dict]:
    cfg = CoderConfig(d_in=5, n_latents=12, d_out=3, activation="jumprelu", skip=True)
    coder = build_coder(cfg, seed=0)
    folder = save_coder(coder, tmp_path / "coder", training={"steps": 17, "final_metrics": {"fve": 0.875}})
    return folder, {k: tuple(v.shape) for k, v in coder.state_dict().items()}


def test_inspect_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, shapes = _saved_coder(tmp_path)
    # W_enc 5x12 + b_enc 12 + W_dec 12x3 + b_dec 3 + W_skip 5x3 + log_threshold 12
    n_params = 5 * 12 + 12 + 12 * 3 + 3 + 5 * 3 + 12
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"tensors ({n_params:,} parameters)" in out
    assert "transcoder: 5 -> 12 latents -> 3, activation jumprelu, skip" in out
    assert "W_skip" in out and "5x3" in out and "0.875" in out and "steps" in out
    assert main(["inspect", str(folder / "weights.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_parameters"] == n_params
    assert {k: tuple(v["shape"]) for k, v in info["tensors"].items()} == shapes
    assert info["config"]["activation"] == "jumprelu" and info["training"]["steps"] == 17
    assert all(v["dtype"] == "float32" for v in info["tensors"].values())


def test_interrupt_and_os_errors_become_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cmd, "run", interrupted)
    assert main(["inspect", "x"]) == 1
    assert capsys.readouterr().err == "mechfaith: interrupted\n"
    monkeypatch.undo()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker / "run"), "--n-steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mechfaith: error: {blocker}")


# --------------------------------------------------------------------------- the real console script


def _command() -> list[str]:
    script = Path(sys.executable).parent / "mechfaith"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mechfaith.cli.main"]


def test_errors_are_one_line_on_stderr_never_a_traceback(tmp_path: Path) -> None:
    folder, _ = _saved_coder(tmp_path)
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside a tensor: only the checksum can tell
    weights.write_bytes(bytes(data))
    foreign = tmp_path / "saelens"
    foreign.mkdir()
    (foreign / "cfg.json").write_text("{}")
    (tmp_path / "bad.toml").write_text("[coder\nd_in = ")
    out = tmp_path / "out"
    cases = {
        "missing": (["inspect", str(tmp_path / "nothing")], 2, "no such file or folder"),
        "corrupt": (["inspect", str(folder)], 2, "checksum mismatch"),
        "foreign": (["inspect", str(foreign)], 2, "SAELens"),
        "bad value": (["train", "--out", str(out), "--k", "many"], 2, "'many' is not a valid int"),
        "bad choice": (["lm", "train", "--sae-site", "x"], 2, "lm train: argument --sae-site: invalid choice: 'x'"),
        "bad config": (["train", "--config", str(tmp_path / "bad.toml"), "--out", str(out)], 2,
                       "not a valid TOML file"),
        "diverged": (["train", "--out", str(out), "--lr", "1e30", "--n-steps", "20", "--d-in", "4",
                      "--n-latents", "8", "--k", "2", "--quiet"], 1, "training diverged at step"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(_command() + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=tmp_path)
             for name, (argv, _, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        _, want_code, want_text = cases[name]
        assert proc.returncode == want_code, (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mechfaith: error: "), (name, stderr)
        assert want_text in lines[0], (name, stderr)
    assert json.loads((out / "train.json").read_text())["status"] == "diverged"
    assert not (out / "coder").exists()  # a diverged run saves no coder


def test_deeply_nested_json_config_is_refused_in_one_line(tmp_path):
    from mechfaith.cli.dataclass_args import load_config_file
    from mechfaith.errors import ConfigError

    path = tmp_path / "deep.json"
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested deeper") as err:
        load_config_file(path)
    assert "\n" not in str(err.value)


def test_a_diverged_run_into_an_old_runs_folder_says_the_coder_is_not_its(tmp_path):
    from mechfaith.cli.main import main

    out = tmp_path / "run"
    small = ["--n-steps", "20", "--d-in", "4", "--n-latents", "8", "--k", "2", "--quiet"]
    assert main(["train", "--out", str(out), *small]) == 0
    before = (out / "coder" / "weights.safetensors").read_bytes()
    assert main(["train", "--out", str(out), "--lr", "1e30", *small]) == 1
    summary = json.loads((out / "train.json").read_text())
    assert summary["status"] == "diverged" and summary["coder"] is None
    assert "earlier run's coder" in summary["note"]
    assert (out / "coder" / "weights.safetensors").read_bytes() == before  # the old coder is kept, untouched
