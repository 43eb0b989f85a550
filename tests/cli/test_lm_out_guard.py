"""``lm export``, ``lm import`` and ``lm collect`` never replace what the user did not ask them to:
an ``--out`` that is a file, the current folder or a folder of other things is refused in one line
(exit 2) and left as it was; a folder they wrote before is replaced whole (re-running works)."""

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.cli.main import main  # noqa: E402

torch.set_num_threads(1)


def _argv(command, src, out):
    if command == "collect":
        return ["lm", "collect", "--model", "random-gpt2", "--train-tokens", "200", "--corpus-source", str(src),
                "--corpus-context-length", "16", "--out", str(out), "--quiet"]
    return ["lm", command, str(src), "--out", str(out)]


@pytest.fixture()
def source(exportable_set, tmp_path):
    def make(command):
        if command != "collect":
            return exportable_set / "layers" / "L0" / "coder"  # one SAELens can hold
        texts = tmp_path / "texts"
        texts.mkdir(exist_ok=True)
        (texts / "a.txt").write_text("the king and the queen " * 300)
        return texts
    return make


@pytest.mark.parametrize("command", ["export", "import", "collect"])
def test_out_is_refused_unless_new_empty_or_our_own(command, source, tmp_path, capsys, monkeypatch):
    src = source(command)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "thesis.tex").write_text("mine too")
    for out in (a_file, crowded):
        assert main(_argv(command, src, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mechfaith: error:") and str(out) in err[0]
    assert a_file.read_text() == "mine" and sorted(p.name for p in crowded.iterdir()) == ["thesis.tex"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or .old left behind
    monkeypatch.chdir(crowded)
    for argv in (_argv(command, src, "."), [*_argv(command, src, "."), "--overwrite"]):  # --out . : no crash
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mechfaith: error:") and "current folder" in err[0], err
    assert sorted(p.name for p in crowded.iterdir()) == ["thesis.tex"]  # no temporary left, inside or beside
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # new, then again into what it wrote: both fine
    fresh = tmp_path / "fresh"
    assert main(_argv(command, src, fresh)) == 0
    assert main(_argv(command, src, fresh)) == 0
    assert any(fresh.iterdir())
