"""``mechfaith convert`` and every command that takes a coder, on files of every readable format:
sparsify folders and runs, SAELens folders, mechfaith sets (one line and exit 2 for what is refused)."""

import json
from pathlib import Path

import pytest
import torch

from mechfaith.cli.main import main
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.coder_set import set_coder_folders

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SPARSIFY = FIXTURES / "sparsify"


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mechfaith: error: "), err
    return err


def test_convert_a_sparsify_folder(tmp_path, capsys):
    assert main(["convert", str(SPARSIFY / "skip_transcoder"), "--to", "mechfaith", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"wrote mechfaith folder {tmp_path / 'c'} (topk transcoder with a skip)" in out and "sparsify folder" in out
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(open_coder(tmp_path / "c").coder(x), open_coder(SPARSIFY / "skip_transcoder").coder(x))


@pytest.mark.parametrize(("argv", "message"), [
    (["--to", "circuit-tracer"], "is one coder; circuit-tracer reads sets of transcoders"),
    (["--to", "dictionary-learning"], "--to dictionary-learning: not yet supported"),
    (["--to", "saelens"], "SAELens has no TopK transcoder"),
    (["--to", "gguf"], "convert: argument --to: invalid choice: 'gguf'"),
    ([], "convert: the following arguments are required: --to"),
])
def test_convert_refusals_are_one_line_exit_2(tmp_path, capsys, argv, message):
    try:
        code = main(["convert", str(SPARSIFY / "transcoder"), "--out", str(tmp_path / "o"), *argv])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    assert code == 2
    assert message in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_unknown_source_lists_the_formats(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(["convert", str(tmp_path / "junk"), "--to", "sparsify", "--out", str(tmp_path / "o")]) == 2
    err = _error(capsys)
    assert "not a coder in a format mechfaith reads" in err and "sparsify run" in err and "SAELens folder" in err


def test_inspect_reads_every_format(capsys):
    assert main(["inspect", str(SPARSIFY / "sae_skip")]) == 0
    out = capsys.readouterr().out
    assert "(sparsify files, read as a mechfaith coder)" in out
    assert "sae: 16 -> 64 latents -> 16, activation topk (k=4), skip" in out
    assert main(["inspect", str(FIXTURES / "saelens" / "jumprelu_transcoder"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "saelens" and info["training"]["layer"] == 3 and info["config"]["activation"] == "jumprelu"
    assert main(["inspect", str(SPARSIFY / "run")]) == 0
    out = capsys.readouterr().out
    assert "(sparsify run: 2 layers of HuggingFaceTB/SmolLM2-135M, mlp_in -> mlp_out)" in out
    assert "not trained by mechfaith" in out and "layers.1.mlp" in out
    assert main(["inspect", str(SPARSIFY / "groupmax")]) == 2
    assert "activation 'groupmax' is not supported" in _error(capsys)


def test_lm_import_and_export_take_sparsify(tmp_path, capsys):
    assert main(["lm", "import", str(SPARSIFY / "run" / "layers.1.mlp"), "--out", str(tmp_path / "c")]) == 0
    assert "layer 1, mlp_in -> mlp_out" in capsys.readouterr().out
    assert main(["lm", "export", str(SPARSIFY / "run"), "--out", str(tmp_path / "e")]) == 2  # TopK transcoders
    assert "layer 0: SAELens has no TopK transcoder" in _error(capsys)
    assert not (tmp_path / "e").exists()


def test_a_trained_set_goes_to_sparsify_and_back(tiny_set, tmp_path, capsys):
    run, back = tmp_path / "run", tmp_path / "back"
    assert main(["convert", str(tiny_set), "--to", "sparsify", "--out", str(run)]) == 0
    assert "wrote a sparsify set of layers 0-1" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["h.0.mlp", "h.1.mlp"]  # random-gpt2: GPT-2's names
    assert main(["convert", str(run), "--to", "mechfaith", "--out", str(back)]) == 0
    assert main(["convert", str(run), "--to", "mechfaith", "--out", str(back)]) == 0  # replaced whole
    capsys.readouterr()
    from mechfaith.circuits.session import load_transcoders

    tcs, model = load_transcoders([str(run)])  # a run is a set for every command that takes coders
    assert sorted(tcs) == [0, 1] and model == "random-gpt2"
    x = torch.randn(8, tcs[0].coder.d_in)
    for layer, folder in set_coder_folders(tiny_set).items():
        original = open_coder(folder).coder
        for other in (tcs[layer].coder, open_coder(set_coder_folders(back)[layer]).coder):
            assert other.cfg == original.cfg
            with torch.no_grad():
                torch.testing.assert_close(other(x), original(x), atol=1e-5, rtol=0)


def test_convert_overwrite_replaces_a_folder_of_other_things_only_when_asked(tmp_path, capsys):
    out = tmp_path / "dst"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    argv = ["convert", str(FIXTURES / "sparsify" / "sae"), "--to", "mechfaith", "--out", str(out)]
    assert main(argv) == 2
    assert "not an empty folder" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and open_coder(out).coder.cfg.activation == "topk"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    src = FIXTURES / "sparsify" / "sae"
    assert main(["convert", str(src), "--to", "sparsify", "--out", str(src), "--overwrite"]) == 2  # never SRC
    assert (src / "cfg.json").is_file()
