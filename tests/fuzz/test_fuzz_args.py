"""Generated command lines (issue 15): for every command, random values for each of its options, read
from the argparse parser itself (typed options get numbers at and beyond their bounds, NaN and
infinities, words; paths get inputs, files and folders of the user's, the current folder; --config gets
good and bad config files), run in-process from a sandbox folder. Models are never loaded: the
functions that start the real work (loading a model, collecting activations, the toy run, the demo's
task, opening a circuit session) raise :class:`ReachedWork`, which counts as the arguments accepted.
The promise: exit 0 or 2, never a traceback, an error as ONE line, nothing written outside --out (nor
into it before the work starts)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hypothesis import event, example, given
from hypothesis import strategies as st

from mechfaith.cli.main import _sub_parsers, build_parser, main
from tests.fuzz import inputs, mutate
from tests.fuzz.helpers import check_outcome, fuzz_settings, sandbox, tree

pytest.importorskip("transformers")
torch.set_num_threads(1)


class ReachedWork(BaseException):
    """Raised where a command starts its real work: its arguments were accepted."""


def _stop(*args: Any, **kwargs: Any) -> Any:
    raise ReachedWork


@pytest.fixture()
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every entry into real work raises :class:`ReachedWork` (each module that binds one is patched)."""
    from mechfaith.circuits import session
    from mechfaith.cli import toy, toy_multihop, train
    from mechfaith.lm import clt_eval, clt_train, collect, evaluate, faithfulness, layer_set, model_cache, set_eval, sweep
    from mechfaith.lm import train as lm_train
    from mechfaith.studies import memorization

    _paths()  # every input built first (with the real functions)
    for module in (model_cache, collect, evaluate, faithfulness, layer_set, set_eval, sweep, lm_train, memorization,
                   clt_train, clt_eval):
        monkeypatch.setattr(module, "get_model", _stop)
    for module in (collect, lm_train, sweep):
        monkeypatch.setattr(module, "collect", _stop)
    monkeypatch.setattr(session, "open_session", _stop)
    monkeypatch.setattr(toy, "run_toy", _stop)
    monkeypatch.setattr(toy_multihop, "run_multihop", _stop)
    monkeypatch.setattr(train, "demo_reference", _stop)


# ------------------------------------------------------------------ values
INTS = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(["0", "-1", "1", "2", "64", "100000", "10**6", str(2**31),
                                                              str(2**63), "1" + "0" * 30, "1.5", "1e3", "0x10", "x",
                                                              "", " 3", "-0", "nan", "inf"]))
FLOATS = st.one_of(st.floats(-10, 10, allow_nan=False).map(repr),
                   st.sampled_from(["0", "-1", "1", "0.5", "1e-320", "1e308", "1e309", "-1e309", "nan", "NaN", "inf",
                                    "-inf", "x", "", "1,2", "1e-3"]))
LISTS = st.one_of(st.lists(st.one_of(INTS, FLOATS), min_size=0, max_size=4).map(",".join),
                  st.sampled_from(["[1, 2]", "0", "0.05", "nan", "inf,1", ",", "x,y", "-1", "1e309"]))
WORDS = st.sampled_from(["", "x", "none", "default", "all", "top", "random-gpt2", "gpt2", "smollm2-135m", "shakespeare",
                         "notes.txt", "crowded", "coder", ".", "..", "/", "/nonexistent/x", "a" * 300, "\u00e9", "-1",
                         "-x", "cuda", "cpu"])
DEVICES = st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:7", "mps", "meta", "cpu:0", "bogus", "", "CPU"])
LAYERS = st.sampled_from(["all", "0", "1", "0-1", "1,0", "0-99", "5-2", "-1", "x", "", "0-1,1", "1" * 30])
FEATURES = st.sampled_from(["0:3", "1:3", "1:3@2", "mlp1tc[3]@2", "0:3*2", "1:5=4", "1:top2", "0:top0", "9:1",
                            "1:99999", "x", "", "1:-3", "1:3@99", "1:3*nan", "1:3=inf", "top", "5"])


def _paths() -> list[str]:
    """Inputs (absolute), the sandbox's entries (relative) and odd names."""
    return [*inputs.tiny_coders(), str(inputs.coder_folders()["topk"]), str(inputs.coder_folders()["relu"]),
            str(inputs.SAELENS / "standard"), str(inputs.legacy_pt()), str(inputs.activation_cache()),
            str(inputs.texts()), str(inputs.demo_run()), "coder", "notes.txt", "crowded", "out", "out/sub",
            "notes.txt/sub", ".", "..", "", "/nonexistent", "config.toml", "deep.json"]


def _value(action: argparse.Action) -> st.SearchStrategy[str]:
    """Values for one option, by what it takes."""
    name = (action.option_strings or [action.dest])[-1].lstrip("-")
    kind = getattr(action.type, "__name__", "") or str(action.metavar or "")
    if action.choices:
        return st.one_of(st.sampled_from([str(c) for c in action.choices]), WORDS)
    if name == "device" or kind == "device":
        return DEVICES
    if name == "layers" or kind == "layers_spec":
        return LAYERS
    if name in ("feature", "features", "logit", "target", "minus"):
        return st.one_of(FEATURES, WORDS)
    if name == "out":  # the sandbox's entries only: an input replaced with --overwrite is what was asked
        return st.sampled_from(["out", "out/sub", "notes.txt", "notes.txt/sub", "crowded", "coder", ".", "..", "",
                                "/", "/nonexistent/out"])
    if name in ("config", "activations", "coder", "source", "path", "coders", "corpus-source", "passage",
                "offdist-source"):
        return st.one_of(st.deferred(lambda: st.sampled_from(_paths())), WORDS)
    if "int" in kind or kind in ("INT", "int"):
        return INTS
    if "float" in kind or kind in ("FLOAT", "RATIO"):
        return FLOATS
    if kind == "VALUE" or name in ("values", "kinds", "dashboards"):
        return st.one_of(LISTS, WORDS)
    return st.one_of(WORDS, st.text(max_size=8))


@functools.lru_cache(maxsize=None)
def _commands() -> list[argparse.ArgumentParser]:
    return [p for p in _sub_parsers(build_parser())
            if not any(isinstance(a, argparse._SubParsersAction) and a.required for a in p._actions)]




def _good(action: argparse.Action) -> st.SearchStrategy[str]:
    """Plausible values for one option, so that a bad value elsewhere meets the checks behind argparse's."""
    name = (action.option_strings or [action.dest])[-1].lstrip("-")
    kind = getattr(action.type, "__name__", "") or str(action.metavar or "")
    fixed = {"device": ["cpu"], "layers": ["0-1", "1", "all"], "feature": ["0:3", "1:3@2*2"], "features": ["1:3", "0:top2"],
             "logit": ["top", "3"], "target": ["3"], "minus": ["5"], "out": ["out"], "config": ["config.toml"],
             "model": ["random-gpt2"], "prompt": ["the king and"], "kinds": ["transcoder", "sae,transcoder"],
             "values": ["2", "2,3"], "dashboards": ["0", "all"], "passage": ["default"], "corpus-source": None,
             "activations": None, "coder": None, "source": None, "path": None, "coders": None}
    if action.choices:
        return st.sampled_from([str(c) for c in action.choices])
    if name in fixed:
        values = fixed[name] or {"corpus-source": [str(inputs.texts())],
                                 "activations": [str(inputs.activation_cache())],
                                 "coder": [str(inputs.coder_folders()["topk"]), str(inputs.demo_run())],
                                 "source": [str(inputs.SAELENS / "standard"), str(inputs.legacy_pt())],
                                 "path": ["coder", str(inputs.demo_run())], "coders": inputs.tiny_coders()}[name]
        return st.sampled_from(values)
    if "int" in kind or kind in ("INT", "int"):
        return st.sampled_from(["1", "2", "3", "4"])
    if "float" in kind or kind in ("FLOAT", "RATIO"):
        return st.sampled_from(["0", "0.1", "0.5", "1"])
    if kind == "VALUE":
        return st.sampled_from(["1", "0,1", "0.5"])
    return st.sampled_from(["x", "1"])


_STRATEGIES: dict[tuple[int, bool], st.SearchStrategy[str]] = {}


def _values_of(action: argparse.Action, good: bool) -> st.SearchStrategy[str]:
    key = (id(action), good)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = _good(action) if good else _value(action)
    return _STRATEGIES[key]


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    """A command and a value (or none) for each of its options, required ones mostly given: all plausible,
    all but one plausible, or all drawn from the hostile values."""
    parser = draw(st.sampled_from(_commands()))
    argv = parser.prog.split()[1:]
    mode = draw(st.sampled_from(["plausible", "one hostile", "one hostile", "one hostile", "hostile"]))
    chosen = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.dest == "verbose_sub":
            continue
        if draw(st.floats(0, 1)) < (0.95 if action.required or not action.option_strings else 0.25):
            chosen.append(action)
    hostile = draw(st.sampled_from(chosen)) if chosen and mode == "one hostile" else None
    for action in chosen:
        flag = action.option_strings[-1] if action.option_strings else None
        if action.nargs == 0:  # store_true, or --x / --no-x
            argv.append(draw(st.sampled_from(action.option_strings)))
            continue
        good = mode == "plausible" or (mode == "one hostile" and action is not hostile)
        n = draw(st.integers(1, 2)) if action.nargs in ("+", "*") else 1
        values = [draw(_values_of(action, good)) for _ in range(n)]
        argv += [flag, *values] if flag else values
    if draw(st.integers(0, 19)) == 0:
        argv.append(draw(st.sampled_from(["--no-such-option", "extra", "--out", "-v", "--quiet"])))
    return argv


# ------------------------------------------------------------------ the sandbox
def _user_files(root: Path) -> None:
    """What the user has in the sandbox: a file, a folder of other things, a coder folder, config files."""
    (root / "notes.txt").write_text("mine")
    (root / "crowded" / "sub").mkdir(parents=True)
    (root / "crowded" / "thesis.tex").write_text("mine too")
    shutil.copytree(inputs.coder_folders()["topk"], root / "coder")
    (root / "config.toml").write_text("[train]\nn_steps = 3\n[coder]\nk = 2\n[lm]\nlayer = 1\n[toy]\nsteps = 5\n")
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)


@contextlib.contextmanager
def _inside(root: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(old)


def _out_of(argv: list[str]) -> str | None:
    """The --out a command line gives (its last one), if any."""
    outs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"]
    return outs[-1] if outs else None


@fuzz_settings(300)
@given(argv=command_lines())
@example(argv=["train", "--out", "notes.txt"])  # output safety: a file at --out
@example(argv=["toy", "--out", "crowded"])  # a folder of other things at --out
@example(argv=["lm", "import", "coder", "--out", "coder"])  # the input itself as --out
@example(argv=["lm", "eval", "notes.txt"])  # found: the default eval.json beside "." (ValueError: empty name)
# found: a command stopped before its result left --out's new parent folder behind (atomic_dir made it)
@example(argv=["circuit", "--coders", "coder", "--prompt", "x", "--feature", "0:3", "--out", "out/sub"])
@example(argv=["lm", "import", "coder", "--out", "out/sub"])  # a command that completes makes --out's parents
def test_generated_command_lines(no_work: None, argv: list[str]) -> None:
    with sandbox() as root:
        _user_files(root)
        before_inputs = tree(inputs.root())
        out = _out_of(argv)
        out_path = (root / out).resolve() if out not in (None, "", ".", "..", "/") else None
        before = tree(root, out_path)
        stderr = io.StringIO()
        with _inside(root), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            outcome = "refused by the command"
            try:
                code: Any = main(argv)
            except SystemExit as exc:
                code, outcome = exc.code, "refused by argparse"
            except ReachedWork:
                code, outcome = 0, "reached the work"
        check_outcome(code, stderr.getvalue(), argv)
        event(outcome if code else "reached the work" if outcome != "refused by argparse" else "help or version")
        after = tree(root, out_path)
        if code == 0 and out_path is not None:  # a command that wrote its --out made the folders above it
            made = {str(p.relative_to(root)) for p in out_path.parents if root in p.parents}
            after = {k: v for k, v in after.items() if not (k in made and k not in before and v == "dir")}
        assert after == before, f"{argv}: a file outside --out changed"
        assert tree(inputs.root()) == before_inputs, f"{argv}: an input changed"


# ------------------------------------------------------------------ config files
# command -> (a valid config of it, the other arguments it needs)
CONFIGS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "train": ({"coder": {"k": 2, "n_latents": 16, "d_in": 8}, "train": {"n_steps": 3, "lr": 0.001}}, []),
    "toy": ({"toy": {"steps": 5, "d": 4, "n_latents": 9, "scan_repeat_fracs": [0.05]}}, []),
    "toy multihop": ({"multihop": {"steps": 5, "n_chains": 1, "sparsity_coefs": [0.0, 0.1]}}, []),
    "lm train": ({"lm": {"model": "random-gpt2", "layer": 1, "train_tokens": 100}, "corpus": {"context_length": 16},
                  "coder": {"k": 2, "expansion": 2}, "train": {"n_steps": 2, "batch_size": 16}}, []),
    "lm collect": ({"lm": {"model": "random-gpt2", "layer": 1}, "corpus": {"context_length": 16, "val_fraction": 0.3},
                    "coder": {"k": 2}}, []),
    "lm sweep": ({"lm": {"model": "random-gpt2"}, "coder": {"activation": "topk"}, "train": {"n_steps": 2}}, []),
    "faithfulness report": ({"faithfulness": {"n_probes": 2, "noise_scales": [0.3]}, "datapoints": {"top_k": 3},
                             "masking": {"max_firing_rate": 0.2}, "lm_faithfulness": {"eval_contexts": 4}}, ["CODER"]),
    "faithfulness experiment": ({"experiment": {"steps": 2, "ks": [2], "rates": [0.0, 0.1]},
                                 "corpus": {"context_length": 16}}, []),
}


def _toml(doc: dict[str, Any]) -> str:
    """A flat two-level TOML of ``doc`` (sections of scalars and lists)."""
    lines = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@st.composite
def config_cases(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(command, file suffix, a damaged config file of that command)."""
    command = draw(st.sampled_from(sorted(CONFIGS)))
    doc = CONFIGS[command][0]
    suffix = draw(st.sampled_from([".json", ".yaml", ".toml"]))
    if suffix == ".toml":
        return command, suffix, draw(mutate.damaged_bytes(_toml(doc).encode()))
    return command, suffix, draw(mutate.json_text(doc)).encode("utf-8", "surrogatepass")


@fuzz_settings(60)
@given(case=config_cases())
def test_damaged_config_files(no_work: None, case: tuple[str, str, bytes]) -> None:
    """A damaged --config (JSON, YAML or TOML) of each command that reads one: one line, or accepted."""
    command, suffix, content = case
    with sandbox() as root:
        config = root / f"config{suffix}"
        config.write_bytes(content)
        extra = [str(inputs.coder_folders()["topk"]) if a == "CODER" else a for a in CONFIGS[command][1]]
        argv = [*command.split(), *extra, "--config", str(config), "--out", str(root / "out")]
        stderr = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            try:
                code: Any = main(argv)
            except SystemExit as exc:
                code = exc.code
            except ReachedWork:
                code = 0
        check_outcome(code, stderr.getvalue(), argv)
        event(f"exit {code}")
