"""Every command that takes a coder takes a set folder (``lm train --layers``), through the real CLI
entry point on a tiny random GPT-2 set: circuit and dashboard give what the explicit list of the
set's coders gives, lm export writes one SAELens folder per layer, inspect shows every layer,
faithfulness report takes --layer; a damaged manifest is one line on stderr, exit 2, nothing written."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.cli.main import main  # noqa: E402
from mechfaith.coders.files import load_coder  # noqa: E402
from mechfaith.lm.coder_files import open_coder  # noqa: E402
from tests.lm.coder_sets import CORRUPTIONS, files_under  # noqa: E402

torch.set_num_threads(1)


def _coders(folder):
    return [str(folder / "layers" / f"L{l}" / "coder") for l in (0, 1)]


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_circuit_of_a_set_is_the_circuit_of_its_coders(tiny_set, tmp_path, capsys):
    argv = ["--prompt", "the king and the queen", "--logit", "top", "--depth", "2", "--beam", "5"]
    assert main(["circuit", "--coders", str(tiny_set), *argv, "--out", str(tmp_path / "a")]) == 0
    assert main(["circuit", "--coders", *_coders(tiny_set), *argv, "--out", str(tmp_path / "b")]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and a["graph.json"] == b["graph.json"] and a["paths.txt"] == b["paths.txt"]
    summary = json.loads(a["circuit.json"])
    assert summary["transcoder_layers"] == [0, 1] and summary["model"] == "random-gpt2"
    assert json.loads(a["graph.json"])["paths"]
    capsys.readouterr()


def test_dashboard_of_a_set_is_the_dashboard_of_its_coders(tiny_set, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(("the crown and the sword of the king, number %d. " % i) * 40)
    argv = ["--features", "1:3,0:top2", "--corpus-source", str(docs), "--context-length", "24", "--contexts", "8"]
    assert main(["dashboard", "--coders", str(tiny_set), *argv, "--out", str(tmp_path / "a")]) == 0
    assert main(["dashboard", "--coders", *_coders(tiny_set), *argv, "--out", str(tmp_path / "b")]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) >= 4 and "index.html" in a and a == b


def test_export_a_set(exportable_set, tmp_path, capsys):
    tiny_set = exportable_set  # ReLU skip transcoders: SAELens has no TopK transcoder
    out = tmp_path / "sl"
    assert main(["lm", "export", str(tiny_set), "--out", str(out)]) == 0
    assert "wrote 2 SAELens folders" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["L0", "L1"]
    for layer, path in enumerate(_coders(tiny_set)):
        back, ours = open_coder(out / f"L{layer}"), load_coder(path)
        assert back.layer == layer and json.loads((out / f"L{layer}" / "cfg.json").read_text())["metadata"][
            "hook_name"] == f"blocks.{layer}.ln2.hook_normalized"
        for name, t in ours.state_dict().items():
            assert torch.equal(back.coder.state_dict()[name], t), (layer, name)
    before = files_under(tmp_path)
    assert main(["lm", "export", str(tiny_set), "--out", str(out)]) == 2  # never over an existing export
    assert "not an empty folder" in capsys.readouterr().err and files_under(tmp_path) == before


def test_eval_of_a_set_refuses_layer(tiny_set, capsys):
    assert main(["lm", "eval", str(tiny_set), "--layer", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layer does not apply to a set" in err[0]
    assert not (tiny_set / "eval.json").exists()


def test_inspect_a_set(tiny_set, capsys):
    assert main(["inspect", str(tiny_set)]) == 0
    text = capsys.readouterr().out
    runs = json.loads((tiny_set / "set.json").read_text())["runs"]
    assert "2 layers of random-gpt2, mlp_in -> mlp_out" in text
    for run in runs:
        row = next(line for line in text.splitlines() if line.split()[:2] == [str(run["layer"]), f"layers/L{run['layer']}/coder"])
        assert "transcoder" in row and "topk k=4" in row and f"{run['final_train_metrics']['fve']:.4f}" in row
    assert main(["inspect", str(tiny_set), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "mechfaith.coder_set" and [r["layer"] for r in info["per_layer"]] == [0, 1]
    assert [r["train_l0"] for r in info["per_layer"]] == [r["final_train_metrics"]["l0"] for r in runs]


def test_faithfulness_report_of_one_layer_of_a_set(set_copy, capsys):
    assert main(["faithfulness", "report", str(set_copy), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mechfaith: error: {set_copy} is a coder set of layers 0-1: choose one with --layer"
    assert main(["faithfulness", "report", str(set_copy), "--layer", "1", "--quiet", "--eval-contexts", "4",
                 "--n-probes", "2", "--spectra-inputs", "2", "--noise-scales", "0.3"]) == 0
    rep = json.loads((set_copy / "layers" / "L1" / "faithfulness" / "faithfulness.json").read_text())
    assert rep["lm"]["layer"] == 1 and rep["lm"]["model"] == "random-gpt2"
    assert not (set_copy / "layers" / "L0" / "faithfulness").exists()


COMMANDS = {
    "inspect": ["inspect", "{set}"],
    "lm eval": ["lm", "eval", "{set}", "--out", "{out}/eval.json", "--quiet"],
    "lm export": ["lm", "export", "{set}", "--out", "{out}"],
    "faithfulness": ["faithfulness", "report", "{set}", "--layer", "1", "--out", "{out}", "--quiet"],
    "circuit": ["circuit", "--coders", "{set}", "--prompt", "x", "--logit", "top", "--out", "{out}"],
    "dashboard": ["dashboard", "--coders", "{set}", "--features", "0:1", "--out", "{out}"],
}


@pytest.mark.parametrize("damage", ["bad json", "foreign format", "layers as text", "coder outside the set",
                                    "coder missing"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_damaged_set_is_one_line_exit_2_and_nothing_written(command, damage, set_copy, tmp_path, capsys):
    change, message = CORRUPTIONS[damage]
    change(set_copy)
    before = files_under(tmp_path)
    argv = [a.replace("{set}", str(set_copy)).replace("{out}", str(tmp_path / "out")) for a in COMMANDS[command]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mechfaith: error: ") and message in err, err
    assert str(set_copy / "set.json") in err and not captured.out
    assert files_under(tmp_path) == before
