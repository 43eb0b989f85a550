"""Bad arguments (issue 15, "Arguments"): every one gives ONE line ``mechfaith: error: ...`` on stderr
and exit 2, checked before any work or any write; Ctrl-C at any moment gives ``mechfaith: interrupted``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from mechfaith.cli import arg_types
from mechfaith.cli import main as cli_main
from mechfaith.cli import train as train_cli
from mechfaith.cli.main import _sub_parsers, build_parser, main
from mechfaith.errors import ConfigError

torch.set_num_threads(1)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mechfaith: error: "), captured.err
    assert "usage:" not in captured.err and "Traceback" not in captured.err
    return lines[0]


def _argparse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, argv
    return _one_error_line(capsys)


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """A bad argument found by the command itself (a config check): return code 2, one line."""
    assert main(argv) == 2, argv
    return _one_error_line(capsys)


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly (a traceback, so the test fails) if a command loads a model or collects activations."""
    # every module that binds get_model is imported (with the real one) before it is replaced, so that
    # none of them keeps the replacement after the test
    from mechfaith.lm import collect, evaluate, faithfulness, layer_set, model_cache, set_eval, sweep
    from mechfaith.lm import train as lm_train
    from mechfaith.studies import memorization

    def loaded(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a model was loaded before the arguments were checked")

    for module in (model_cache, lm_train, layer_set, sweep, collect, evaluate, faithfulness, set_eval,
                   memorization):
        monkeypatch.setattr(module, "get_model", loaded)
    monkeypatch.setattr(collect, "collect", loaded)
    monkeypatch.setattr(lm_train, "collect", loaded)
    monkeypatch.setattr(sweep, "collect", loaded)


# --------------------------------------------------------------------------- 1. argparse errors


def _generated_argparse_cases() -> list[tuple[list[str], list[str]]]:
    """(command, argv) for every (nested) sub-command: no arguments (missing required ones), an unknown
    option, a bad choice for each option with choices, a malformed value for each typed option, a missing
    value for each option that takes one, a value given to each flag that takes none."""
    cases: list[tuple[list[str], list[str]]] = []
    for parser in [build_parser(), *_sub_parsers(build_parser())]:
        path = parser.prog.split()[1:]
        cases.append((path, [*path, "--no-such-option"]))
        if any(a.required for a in parser._actions):
            cases.append((path, path))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                cases.append((path, [*path, "no-such-command"]))
            elif isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or not action.option_strings:
                continue
            elif action.nargs == 0:
                cases.append((path, [*path, f"{action.option_strings[-1]}=x"]))
            else:
                flag = action.option_strings[-1]
                if action.choices is not None:
                    cases.append((path, [*path, flag, "no-such-choice"]))
                if action.type is not None:
                    cases.append((path, [*path, flag, "x"]))
                cases.append((path, [*path, flag]))  # the value is missing
    return cases


def test_every_argparse_error_is_one_line_in_every_command(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)  # one parser for the ~500 cases: fast
    cases = _generated_argparse_cases()
    assert len(cases) >= 300  # every option of every command, nested ones included
    for path, argv in cases:
        line = _argparse_error(argv, capsys)
        if path:  # the command's own parser says which command it is
            assert line.startswith(f"mechfaith: error: {' '.join(path)}: "), (argv, line)


def test_argparse_errors_name_the_command_and_the_problem(capsys: pytest.CaptureFixture[str]) -> None:
    assert _argparse_error(["lm", "train", "--sae-site", "x"], capsys) == (
        "mechfaith: error: lm train: argument --sae-site: invalid choice: 'x' (choose from 'input', 'output')")
    assert _argparse_error(["circuit", "--coders", "a"], capsys) == (
        "mechfaith: error: circuit: the following arguments are required: --prompt")
    assert "lm eval: argument --layer: invalid int value: 'x'" in _argparse_error(["lm", "eval", "c", "--layer", "x"],
                                                                                   capsys)
    assert _argparse_error(["inspect", "x", "--no-such-option"], capsys) == (
        "mechfaith: error: inspect: unrecognized arguments: --no-such-option")
    assert _argparse_error(["lm", "export", "c", "--out", "o", "extra"], capsys) == (
        "mechfaith: error: lm export: unrecognized arguments: extra")
    assert _argparse_error(["--no-such-option"], capsys) == "mechfaith: error: unrecognized arguments: --no-such-option"
    assert _argparse_error(["faithfulness"], capsys).startswith("mechfaith: error: faithfulness: the following")


def test_help_still_prints_the_full_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["lm", "train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mechfaith lm train") and "--resume" in out and "--k INT" in out


# --------------------------------------------------------------------------- 2. --device


def test_device_problem_names_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    assert arg_types.device_problem("cpu") is None and arg_types.device_problem("cpu:0") is None
    assert "not a torch device" in str(arg_types.device_problem("bogus"))
    assert "not supported" in str(arg_types.device_problem("meta"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in str(arg_types.device_problem("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert arg_types.device_problem("cuda:1") is None and arg_types.device_problem("cuda") is None
    assert "has 2 CUDA device(s)" in str(arg_types.device_problem("cuda:2"))
    with pytest.raises(ConfigError, match="^--x: 'bogus' is not a torch device"):
        arg_types.check_device("bogus", "--x")


def test_bogus_device_in_circuit_is_an_argument_error_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    line = _argparse_error(["circuit", "--coders", "nowhere", "--prompt", "hi", "--logit", "top",
                            "--device", "bogus"], capsys)
    assert line == ("mechfaith: error: circuit: argument --device: 'bogus' is not a torch device "
                    "(cpu, cuda, cuda:N or mps)")
    for argv in (["dashboard", "--coders", "c", "--features", "1:2"], ["graph", "--coders", "c", "--prompt", "p"],
                 ["intervene", "--coders", "c", "--prompt", "p", "--feature", "1:2"], ["lm", "eval", "c"],
                 ["faithfulness", "report", "c"]):
        assert "argument --device: 'bogus' is not a torch device" in _argparse_error([*argv, "--device", "bogus"],
                                                                                       capsys)


def test_cuda_without_cuda_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _argparse_error(["intervene", "--coders", "c", "--prompt", "p", "--feature", "1:2", "--device", "cuda"],
                           capsys)
    assert line.endswith("argument --device: 'cuda': CUDA is not available on this machine")


def test_bogus_device_in_train_leaves_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _error(["train", "--out", str(out), "--device", "bogus", "--quiet"], capsys) == (
        "mechfaith: error: --device: 'bogus' is not a torch device (cpu, cuda, cuda:N or mps)")
    assert not out.exists()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\ndevice = "cuda:99"\n')
    if not torch.cuda.is_available():
        assert "--device: 'cuda:99'" in _error(["train", "--out", str(out), "--config", str(cfg)], capsys)
        assert not out.exists()


def test_bogus_device_in_lm_commands_is_refused_before_the_model(no_model: None, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("collect", "train", "sweep"):
        out = tmp_path / command
        line = _error(["lm", command, "--out", str(out), "--device", "bogus", "--quiet"], capsys)
        assert line.startswith("mechfaith: error: --device: 'bogus' is not a torch device"), line
        assert not out.exists()
    line = _error(["faithfulness", "experiment", "--out", str(tmp_path / "e"), "--device", "bogus"], capsys)
    assert "--device: 'bogus'" in line and not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- 3. counts and config keys


@pytest.mark.parametrize("argv, flag", [
    (["dashboard", "--coders", "c", "--features", "1:2", "--contexts", "0"], "--contexts"),
    (["dashboard", "--coders", "c", "--features", "1:2", "--k", "0"], "--k"),
    (["dashboard", "--coders", "c", "--features", "1:2", "--per-band", "-2"], "--per-band"),
    (["dashboard", "--coders", "c", "--features", "1:2", "--context-length", "1"], "--context-length"),
    (["lm", "eval", "c", "--eval-contexts", "0"], "--eval-contexts"),
    (["lm", "eval", "c", "--batch-contexts", "0"], "--batch-contexts"),
    (["lm", "eval", "c", "--keep-massive", "nan"], "--keep-massive"),
    (["lm", "eval", "c", "--keep-massive", "-1"], "--keep-massive"),
    (["circuit", "--coders", "c", "--prompt", "p", "--logit", "top", "--depth", "0"], "--depth"),
    (["circuit", "--coders", "c", "--prompt", "p", "--logit", "top", "--beam", "0"], "--beam"),
    (["circuit", "--coders", "c", "--prompt", "p", "--logit", "top", "--per-node", "-1"], "--per-node"),
    (["circuit", "--coders", "c", "--prompt", "p", "--logit", "top", "--min-abs", "nan"], "--min-abs"),
    (["circuit", "--coders", "c", "--prompt", "p", "--logit", "top", "--show", "-1"], "--show"),
    (["graph", "--coders", "c", "--prompt", "p", "--check", "-1"], "--check"),
    (["graph", "--coders", "c", "--prompt", "p", "--dashboard-contexts", "0"], "--dashboard-contexts"),
    (["intervene", "--coders", "c", "--prompt", "p", "--feature", "1:2", "--top", "0"], "--top"),
    (["train", "--density", "nan"], "--density"),
    (["lm", "train", "--layers", "3-x"], "--layers"),
    (["lm", "collect", "--layers", "-1"], "--layers"),
])
def test_counts_sizes_and_rates_out_of_range_are_argument_errors(argv: list[str], flag: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert f"argument {flag}: " in _argparse_error(argv, capsys)


def test_dashboard_contexts_0_no_longer_crashes(capsys: pytest.CaptureFixture[str]) -> None:
    line = _argparse_error(["dashboard", "--coders", "c", "--features", "1:2", "--contexts", "0"], capsys)
    assert line == "mechfaith: error: dashboard: argument --contexts: must be an integer >= 1, got '0'"


def test_lm_sweep_k_0_is_refused_before_the_model(no_model: None, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sw"
    assert _error(["lm", "sweep", "--k", "0", "--out", str(out)], capsys) == (
        "mechfaith: error: LMCoderConfig.k must be a positive integer, got 0")
    for values, problem in (("nan", "sparsity coefficients must be finite"), ("1,inf", "sparsity coefficients"),
                            ("-1", "sparsity coefficients")):
        line = _error(["lm", "sweep", "--activation", "relu", "--sparsity", "l1", "--values", values,
                       "--out", str(out)], capsys)
        assert problem in line, line
    assert "TopK sweep values are k" in _error(["lm", "sweep", "--values", "0,inf", "--out", str(out)], capsys)
    assert not out.exists()


def test_lm_collect_refuses_unknown_keys_in_every_section(no_model: None, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cache"
    for section, key, cls in (("train", "n_stpes", "TrainConfig"), ("coder", "kk", "LMCoderConfig"),
                              ("lm", "layr", "LMConfig"), ("corpus", "sorce", "CorpusConfig")):
        cfg = tmp_path / f"{section}.toml"
        cfg.write_text(f"[{section}]\n{key} = 1\n")
        line = _error(["lm", "collect", "--config", str(cfg), "--out", str(out)], capsys)
        assert line == f"mechfaith: error: {cls}: unknown option '{key}' in the config file"
    assert not out.exists()


# --------------------------------------------------------------------------- 4. non-finite values


def _cli_configs() -> list[tuple[type, dict[str, Any]]]:
    from mechfaith.circuits.attribution_graph import GraphConfig
    from mechfaith.circuits.search import SearchConfig
    from mechfaith.coders.config import CoderConfig
    from mechfaith.faithfulness.datapoints import DatapointConfig
    from mechfaith.faithfulness.masking import MaskingConfig
    from mechfaith.faithfulness.report import FaithfulnessConfig
    from mechfaith.lm.config import LMCoderConfig, LMConfig
    from mechfaith.lm.corpus import CorpusConfig
    from mechfaith.lm.faithfulness import LMFaithfulnessConfig
    from mechfaith.studies.memorization import ExperimentConfig
    from mechfaith.toy.experiments import ToyConfig
    from mechfaith.training.config import TrainConfig

    return [(CoderConfig, {"d_in": 4, "n_latents": 8}), (TrainConfig, {}), (LMConfig, {}), (LMCoderConfig, {}),
            (CorpusConfig, {}), (ToyConfig, {}), (FaithfulnessConfig, {}), (LMFaithfulnessConfig, {}),
            (DatapointConfig, {}), (MaskingConfig, {}), (ExperimentConfig, {}), (GraphConfig, {}), (SearchConfig, {})]


def test_every_float_field_of_every_config_refuses_nan_and_infinity() -> None:
    checked = 0
    for cls, required in _cli_configs():
        cls(**required)  # the defaults are fine
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            is_list = typing.get_origin(tp) is list and typing.get_args(tp) == (float,)
            if tp is not float and not is_list:
                continue
            for bad in (math.nan, math.inf, -math.inf):
                value = [0.1, bad] if is_list else bad
                with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{f.name} must be a finite number"):
                    cls(**{**required, f.name: value})
                checked += 1
    assert checked >= 3 * 40


@pytest.mark.parametrize("flag, value, field", [("--lr", "inf", "TrainConfig.lr"),
                                                ("--init-scale", "inf", "CoderConfig.init_scale"),
                                                ("--jumprelu-threshold", "nan", "CoderConfig.jumprelu_threshold"),
                                                ("--sparsity-coef", "-inf", "TrainConfig.sparsity_coef"),
                                                ("--adam-eps", "inf", "TrainConfig.adam_eps")])
def test_train_refuses_non_finite_values_before_training(flag: str, value: str, field: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _error(["train", "--out", str(out), f"{flag}={value}", "--quiet"], capsys) == (
        f"mechfaith: error: {field} must be a finite number, got {float(value)!r}")
    assert not out.exists()  # refused, not "diverged" with exit 1


def test_lm_and_toy_configs_refuse_non_finite_values(no_model: None, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert "LMConfig.massive_ratio must be a finite number" in _error(
        ["lm", "train", "--out", str(out), "--massive-ratio", "inf"], capsys)
    assert "LMCoderConfig.latent_init_fraction must be a finite number" in _error(
        ["lm", "train", "--out", str(out), "--latent-init-fraction", "nan"], capsys)
    assert "ToyConfig.lr must be a finite number" in _error(["toy", "--out", str(out), "--lr", "inf"], capsys)
    assert "ToyConfig.lr must be > 0" in _error(["toy", "--out", str(out), "--lr", "0"], capsys)
    assert not out.exists()


# --------------------------------------------------------------------------- 5. lm train checks first


def test_lm_train_k_0_fails_before_collecting(no_model: None, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _error(["lm", "train", "--k", "0", "--out", str(out), "--quiet"], capsys) == (
        "mechfaith: error: LMCoderConfig.k must be a positive integer, got 0")
    cases = {
        ("--jumprelu-threshold", "-1"): "LMCoderConfig: jumprelu_threshold and jumprelu_bandwidth must be > 0",
        ("--activation", "relu"): "a ReLU coder needs a sparsity penalty",
        ("--activation", "jumprelu"): "a JumpReLU coder is trained with --sparsity l0",
        ("--sparsity", "l0"): "the l0 penalty needs a JumpReLU coder",
    }
    for (flag, value), problem in cases.items():
        argv = ["lm", "train", flag, value, "--out", str(out), "--quiet"]
        assert problem in _error(argv, capsys), argv
        assert problem in _error([*argv, "--layers", "0,1"], capsys), argv  # a set too
    line = _error(["lm", "sweep", "--kinds", "sae", "--jacobian-coef", "0.1", "--out", str(out)], capsys)
    assert "Jacobian matching needs a transcoder" in line
    assert not out.exists()


# --------------------------------------------------------------------------- 6. --resume


def test_resume_without_a_checkpoint_is_refused(no_model: None, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _error(["train", "--resume", "--out", str(out), "--quiet"], capsys) == (
        f"mechfaith: error: --resume: no checkpoint in {out / 'checkpoint'} (nothing to resume; "
        f"start without --resume)")
    assert not out.exists()
    assert _error(["lm", "train", "--resume", "--out", str(out), "--quiet"], capsys) == (
        f"mechfaith: error: --resume: no checkpoint in {out / 'checkpoint'} (nothing to resume; "
        f"start without --resume)")
    line = _error(["lm", "train", "--layers", "all", "--resume", "--out", str(out), "--quiet"], capsys)
    assert f"--resume: no checkpoint in {out / 'layers' / 'L*' / 'checkpoint'}" in line
    assert not out.exists()


def test_train_resume_continues_from_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    small = ["--out", str(out), "--d-in", "4", "--n-latents", "8", "--k", "2", "--batch-size", "16", "--quiet",
             "--checkpoint-every", "3", "--log-every", "1"]
    assert main(["train", *small, "--n-steps", "3"]) == 0
    assert main(["train", *small, "--n-steps", "5", "--resume"]) == 0
    assert "trained 5 steps" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # steps 4 and 5 continued the first run's 3


# --------------------------------------------------------------------------- 7. Ctrl-C


def test_interrupt_while_the_commands_are_imported(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(subparsers: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "add_parser", interrupted)  # build_parser imports every command
    assert main(["inspect", "x"]) == 1
    assert capsys.readouterr().err == "mechfaith: interrupted\n"


class _InterruptingImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_interrupt_during_an_import_inside_a_command(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    name = "mechfaith.circuits.dashboard_data"
    if name in sys.modules:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_InterruptingImport(name), *sys.meta_path])
    assert main(["dashboard", "--coders", "c", "--features", "1:2"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "mechfaith: interrupted\n" and captured.out == ""


def test_interrupt_in_a_command_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "_train", lambda *a: interrupted(a[0]))
    assert main(["train", "--out", str(tmp_path / "r"), "--quiet"]) == 1
    assert capsys.readouterr().err == "mechfaith: interrupted\n"
