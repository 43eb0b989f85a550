"""Output safety in every command that writes (issue 15): an existing ``--out`` that is a file, or a
folder holding things the command did not write, is refused in one line (exit 2) and left exactly as it
was, unless ``--overwrite``; with it the old entry is replaced whole, only once the new result is
complete. A JSON ``--out`` (``lm eval``, ``intervene``) refuses a folder, and a file it did not write
unless ``--overwrite``. Each command runs in-process on tiny random models (seconds each)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.cli.main import _sub_parsers, build_parser, main  # noqa: E402
from mechfaith.coders.coder import SparseCoder  # noqa: E402
from mechfaith.coders.config import CoderConfig  # noqa: E402
from mechfaith.coders.files import save_coder  # noqa: E402

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "saelens"
WORDS = "the king queen lord love death night day sword crown heart blood".split()


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Inputs of every command: a text corpus, two random-gpt2 transcoders (layer 1's in a run folder
    with its corpus recorded), a ReLU coder SAELens can hold and a passage for the experiment."""
    root = tmp_path_factory.mktemp("inputs")
    texts = root / "texts"
    texts.mkdir()
    rng = random.Random(5)
    for i in range(3):
        (texts / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(800)))
    corpus = {"source": str(texts), "context_length": 16, "val_fraction": 0.34}
    g = torch.Generator().manual_seed(0)
    coders = []
    for layer in (0, 1):
        c = SparseCoder(CoderConfig(d_in=32, n_latents=64, activation="topk", k=4, skip=True), generator=g)
        folder = root / ("run/coder" if layer == 1 else "l0")
        save_coder(c, folder, training={"model": "random-gpt2", "layer": layer, "input_site": "mlp_in",
                                        "output_site": "mlp_out", "corpus": corpus})
        coders.append(str(folder))
    relu = SparseCoder(CoderConfig(d_in=32, n_latents=64, activation="relu"), generator=g)
    save_coder(relu, root / "relu", training={"model": "random-gpt2", "layer": 0, "input_site": "mlp_in",
                                              "output_site": "mlp_out"})
    (root / "passage.txt").write_text("the crown of the king is the heart of the night " * 3)
    return {"texts": str(texts), "l0": coders[0], "l1": coders[1], "run": str(root / "run"),
            "relu": str(root / "relu"), "passage": str(root / "passage.txt")}


def _small(fx: dict[str, str]) -> list[str]:
    return ["--model", "random-gpt2", "--layer", "1", "--train-tokens", "300", "--eval-contexts", "2",
            "--batch-contexts", "4", "--corpus-source", fx["texts"], "--corpus-context-length", "16",
            "--corpus-val-fraction", "0.34", "--quiet"]


TINY_TRAIN = ["--n-steps", "3", "--batch-size", "32", "--log-every", "3", "--expansion", "2", "--k", "2"]
Argv = Callable[[str, dict[str, str]], list[str]]

# command -> (argv for an --out, whether --out is a JSON file)
COMMANDS: dict[str, tuple[Argv, bool]] = {
    "toy": (lambda out, fx: ["toy", "--out", out, "--quick", "--quiet", "--steps", "60", "--d", "5", "--n-latents",
                             "12", "--batch", "32", "--seeds", "1", "--extra-seeds", "0", "--scan-seeds", "1",
                             "--scan-repeat-fracs", "0.05", "--scan-sparsity-coefs", "0.2", "--val-samples", "400",
                             "--library-samples", "300"], False),
    "toy multihop": (lambda out, fx: ["toy", "multihop", "--out", out, "--quick", "--quiet", "--steps", "20",
                                      "--seeds", "1", "--batch", "16"], False),
    "train": (lambda out, fx: ["train", "--out", out, "--quiet", "--n-steps", "4", "--batch-size", "16", "--d-in", "8",
                               "--n-latents", "16", "--k", "2", "--log-every", "2"], False),
    "lm collect": (lambda out, fx: ["lm", "collect", "--out", out, *_small(fx)], False),
    "lm train": (lambda out, fx: ["lm", "train", "--out", out, *_small(fx), *TINY_TRAIN], False),
    "lm train --layers": (lambda out, fx: ["lm", "train", "--layers", "0-1", "--out", out, *_small(fx),
                                           *TINY_TRAIN], False),
    "lm eval": (lambda out, fx: ["lm", "eval", fx["run"], "--out", out, "--eval-contexts", "2",
                                 "--corpus-source", fx["texts"], "--quiet"], True),
    "lm sweep": (lambda out, fx: ["lm", "sweep", "--out", out, "--values", "2", "--kinds", "transcoder",
                                  *_small(fx), *TINY_TRAIN[:6]], False),
    "lm export": (lambda out, fx: ["lm", "export", fx["relu"], "--out", out], False),
    "lm import": (lambda out, fx: ["lm", "import", str(FIXTURES / "standard"), "--out", out], False),
    "convert": (lambda out, fx: ["convert", fx["relu"], "--to", "saelens", "--out", out], False),
    "faithfulness report": (lambda out, fx: ["faithfulness", "report", fx["run"], "--out", out, "--quiet",
                                             "--eval-contexts", "4", "--n-probes", "1", "--spectra-inputs", "1",
                                             "--noise-scales", "0.3", "--passage", "none"], False),
    "faithfulness experiment": (lambda out, fx: [
        "faithfulness", "experiment", "--out", out, "--quiet", "--model", "random-gpt2", "--layers", "1",
        "--rates", "0.2", "--arms", "topk-skip",
        "--jacobian-coefs", "0", "--ks", "2", "--seeds", "0", "--n-latents", "16", "--steps", "2",
        "--batch-size", "32", "--train-tokens", "200", "--passages", fx["passage"], "--eval-contexts", "2",
        "--passage-eval-contexts", "1", "--detector-contexts", "2", "--jacobian-rows", "8", "--eval-probes", "1",
        "--batch-contexts", "4", "--corpus-source", fx["texts"], "--corpus-context-length", "16",
        "--corpus-val-fraction", "0.34"], False),
    "circuit": (lambda out, fx: ["circuit", "--coders", fx["l0"], fx["l1"], "--prompt", "the king and",
                                 "--logit", "top", "--depth", "2", "--beam", "3", "--out", out], False),
    "graph": (lambda out, fx: ["graph", "--coders", fx["l0"], fx["l1"], "--prompt", "the king and",
                               "--max-feature-nodes", "8", "--check", "0", "--dashboards", "0", "--out", out,
                               "--quiet"], False),
    "intervene": (lambda out, fx: ["intervene", "--coders", fx["l0"], fx["l1"], "--prompt", "the king and",
                                   "--feature", "0:3", "--world", "frozen", "--top", "3", "--out", out], True),
    "dashboard": (lambda out, fx: ["dashboard", "--coders", fx["l0"], fx["l1"], "--features", "1:3",
                                   "--corpus-source", fx["texts"], "--context-length", "16", "--contexts", "3",
                                   "--out", out], False),
}


def _tree(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (hidden ones too): relative name -> its bytes, or "dir"."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _user_area(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A folder of the user's: a file ``notes.txt`` and a folder ``crowded/`` of other things."""
    area = tmp_path / "user"
    (area / "crowded" / "sub").mkdir(parents=True)
    (area / "notes.txt").write_text("mine")
    (area / "crowded" / "thesis.tex").write_text("mine too")
    (area / "crowded" / "sub" / "data.csv").write_text("1,2\n")
    return area, area / "notes.txt", area / "crowded"


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mechfaith: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, (argv, captured.err)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_existing_out_is_refused_and_untouched(command: str, fx: dict[str, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A file, or a folder of other things, at --out: one line, exit 2, nothing touched (no temporary left);
    a JSON --out that is a folder is refused even with --overwrite."""
    argv, file_out = COMMANDS[command]
    area, a_file, crowded = _user_area(tmp_path)
    before = _tree(area)
    for target in (a_file, crowded):
        line = _refused(argv(str(target), fx), capsys)
        assert str(target) in line
        if not (file_out and target == crowded):
            assert "--overwrite" in line
    if file_out:
        assert "is a folder" in _refused([*argv(str(crowded), fx), "--overwrite"], capsys)
    assert _tree(area) == before


@pytest.mark.parametrize("command", list(COMMANDS))
def test_overwrite_replaces_it_whole_and_own_results_are_rewritten(command: str, fx: dict[str, str], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite replaces the user's entry whole (a folder: none of its old files is left); then the same
    command writes again into what it wrote, without --overwrite."""
    argv, file_out = COMMANDS[command]
    area, a_file, crowded = _user_area(tmp_path)
    target = a_file if file_out else crowded
    _ok([*argv(str(target), fx), "--overwrite"], capsys)
    if file_out:
        assert json.loads(target.read_text())["command"] in ("eval", "intervene")
    else:
        names = {p.name for p in target.iterdir()}
        assert names and not names & {"thesis.tex", "sub"}, names
    if command == "toy":  # (a second toy run costs 15 s: its names are checked as a rerun checks them)
        from mechfaith.atomic import check_replaceable
        from mechfaith.cli.toy import OWN_NAMES

        check_replaceable(target, OWN_NAMES, "toy report")
    else:
        _ok(argv(str(target), fx), capsys)  # its own result: written again
    assert sorted(p.name for p in area.iterdir()) == sorted(["notes.txt", "crowded"])  # no temporary, no .old


@pytest.mark.parametrize("command", ["train", "lm import", "lm export", "lm collect"])
def test_overwrite_replaces_a_file_with_the_folder(command: str, fx: dict[str, str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    argv, _ = COMMANDS[command]
    area, a_file, _ = _user_area(tmp_path)
    _ok([*argv(str(a_file), fx), "--overwrite"], capsys)
    assert a_file.is_dir() and any(a_file.iterdir())
    assert sorted(p.name for p in area.iterdir()) == ["crowded", "notes.txt"]


def test_every_command_with_out_has_overwrite() -> None:
    missing = [p.prog for p in _sub_parsers(build_parser())
               if "--out" in p._option_string_actions and "--overwrite" not in p._option_string_actions]
    assert not missing
    assert {" ".join(p.prog.split()[1:]) for p in _sub_parsers(build_parser())
            if "--out" in p._option_string_actions} == {c.removesuffix(" --layers") for c in COMMANDS}


def test_overwrite_keeps_the_old_folder_when_the_new_result_never_completes(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A run that diverges (exit 1) or is interrupted with --overwrite leaves the user's folder as it was."""
    area, _, crowded = _user_area(tmp_path)
    before = _tree(area)
    diverging = ["train", "--out", str(crowded), "--overwrite", "--quiet", "--n-steps", "30", "--batch-size", "16",
                 "--d-in", "8", "--n-latents", "16", "--k", "2", "--lr", "1e30"]
    assert main(diverging) == 1
    assert "training diverged" in capsys.readouterr().err
    assert _tree(area) == before


def test_interrupted_overwrite_leaves_the_old_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mechfaith.cli import train as train_cli

    def interrupted(*args: Any, **kwargs: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "_train", interrupted)
    area, _, crowded = _user_area(tmp_path)
    before = _tree(area)
    assert main(COMMANDS["train"][0](str(crowded), {}) + ["--overwrite"]) == 1
    assert capsys.readouterr().err.strip() == "mechfaith: interrupted"
    assert _tree(area) == before


def test_resume_writes_into_its_own_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume continues in the run's folder (a temporary an interrupted checkpoint write left there is
    its own); --resume with --overwrite is refused."""
    out = tmp_path / "run"
    argv = [*COMMANDS["train"][0](str(out), {}), "--checkpoint-every", "2"]
    _ok(argv, capsys)
    (out / ".checkpoint.abcd1234.tmp").mkdir()  # left by a killed checkpoint write
    _ok([*argv, "--n-steps", "6", "--resume"], capsys)
    assert json.loads((out / "train.json").read_text())["steps"] == 6
    line = _refused([*argv, "--resume", "--overwrite"], capsys)
    assert "--resume" in line and "--overwrite" in line


def test_the_current_folder_is_never_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    area, _, crowded = _user_area(tmp_path)
    before = _tree(area)
    monkeypatch.chdir(crowded / "sub")
    for out in (".", str(crowded)):
        assert "current folder" in _refused([*COMMANDS["train"][0](out, {}), "--overwrite"], capsys)
    assert _tree(area) == before


def test_recorded_paths_name_the_final_folder(fx: dict[str, str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """lm train --overwrite trains in a temporary folder; what train.json and collect.json record is --out."""
    area, _, crowded = _user_area(tmp_path)
    _ok([*COMMANDS["lm train"][0](str(crowded), fx), "--overwrite"], capsys)
    trained = json.loads((crowded / "train.json").read_text())
    assert trained["coder_folder"] == str(crowded / "coder") and trained["activations"] == str(crowded / "activations")
    assert json.loads((crowded / "activations" / "collect.json").read_text())["folder"] == str(crowded / "activations")


def test_eval_keeps_its_own_default_and_refuses_a_foreign_one(fx: dict[str, str], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """lm eval's default eval.json beside the coder: rewritten when lm eval wrote it, else refused."""
    import shutil

    run = Path(shutil.copytree(fx["run"], tmp_path / "run"))
    argv = ["lm", "eval", str(run), "--eval-contexts", "2", "--corpus-source", fx["texts"], "--quiet"]
    (run / "eval.json").write_text('{"mine": true}')
    assert "eval.json" in _refused(argv, capsys)
    assert json.loads((run / "eval.json").read_text()) == {"mine": True}
    _ok([*argv, "--overwrite"], capsys)
    _ok(argv, capsys)
    assert json.loads((run / "eval.json").read_text())["command"] == "eval"
