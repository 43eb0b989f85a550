"""dictionary_learning's own files (tests/fixtures/dictionary_learning, written by dictionary_learning
0.1.0 itself with benchmarks/make_dictionary_learning_fixtures.py): every dictionary mechfaith reads
gives the library's features and outputs to 1e-5, what changes the computation (the class, the
BatchTopK threshold) is honoured, the rest is refused in one line, the file is read with
torch.load(weights_only=True) only, and the files are recognised and converted. Needs no
dictionary_learning."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechfaith.errors import CoderFileError
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.convert import convert
from mechfaith.lm.dictionary_learning import import_dictionary_learning
from mechfaith.lm.formats import detect_format

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "dictionary_learning"
READ = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.safetensors").is_file())
REFUSED_FIXTURES = {"gated": "dict_class GatedAutoEncoder is not supported: separate gate and magnitude encoders"}
ACTIVATIONS = {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "batchtopk_no_threshold": "relu",
               "jumprelu": "jumprelu"}


def _expected(name):
    return load_file(str(FIXTURES / name / "expected.safetensors"))


def _copy(tmp_path, name, change=None, tensors=None):
    folder = shutil.copytree(FIXTURES / name, tmp_path / name)
    if change:
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg["trainer"])
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensors:
        sd = torch.load(folder / "ae.pt", weights_only=True)
        tensors(sd)
        torch.save(sd, folder / "ae.pt")
    return folder


def test_fixtures_cover_every_dictionary():
    assert {p.name for p in FIXTURES.iterdir() if p.is_dir()} == set(READ) | set(REFUSED_FIXTURES)
    assert set(READ) == set(ACTIVATIONS)
    classes = {json.loads((FIXTURES / n / "config.json").read_text())["trainer"]["dict_class"] for n in READ}
    assert classes == {"AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder"}


@pytest.mark.parametrize("name", READ)
def test_fixture_gives_the_library_features_and_outputs(name):
    e = _expected(name)
    imp = import_dictionary_learning(FIXTURES / name)
    with torch.no_grad():
        torch.testing.assert_close(imp.coder.encode(e["x"]), e["features"], atol=1e-5, rtol=0)
        torch.testing.assert_close(imp.coder(e["x"]), e["x_hat"], atol=1e-5, rtol=0)
    fired = int(e["features"].count_nonzero())
    assert 0 < fired < e["features"].numel()
    cfg = imp.coder.cfg
    assert (cfg.d_in, cfg.n_latents, cfg.d_out, cfg.kind, cfg.activation) == (16, 64, 16, "sae", ACTIVATIONS[name])
    assert (imp.layer, imp.model_name) == (3, "EleutherAI/pythia-70m-deduped")
    if cfg.activation in ("topk", "batchtopk"):
        assert cfg.k == 4
    if name == "batchtopk":
        assert float(imp.coder.batchtopk_threshold) == pytest.approx(0.3)


def test_the_file_alone_and_a_checkpoint_read_the_same(tmp_path):
    folder = shutil.copytree(FIXTURES / "jumprelu", tmp_path / "run")
    (folder / "checkpoints").mkdir()
    shutil.copy(folder / "ae.pt", folder / "checkpoints" / "ae_100.pt")
    e = _expected("jumprelu")
    for path in (folder / "ae.pt", folder / "checkpoints" / "ae_100.pt"):
        imp = import_dictionary_learning(path)
        assert imp.layer == 3
        with torch.no_grad():
            torch.testing.assert_close(imp.coder(e["x"]), e["x_hat"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "change"), [
    ("topk", lambda t: t.update(dict_class="BatchTopKSAE")),  # then its threshold (0.25) is used
    ("batchtopk", lambda t: t.update(dict_class="AutoEncoderTopK")),  # then k per input
])
def test_the_dict_class_is_honoured(tmp_path, name, change):
    e = _expected(name)
    wrong = import_dictionary_learning(_copy(tmp_path, name, change)).coder
    with torch.no_grad():
        assert (wrong(e["x"]) - e["x_hat"]).abs().max() > 1e-2


def test_the_batchtopk_threshold_is_honoured(tmp_path):
    e = _expected("batchtopk")
    wrong = import_dictionary_learning(_copy(tmp_path, "batchtopk", tensors=lambda t: t["threshold"].fill_(0.05)))
    with torch.no_grad():
        assert (wrong.coder(e["x"]) - e["x_hat"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", sorted(REFUSED_FIXTURES))
def test_refused_fixture_is_one_line_naming_it(name):
    with pytest.raises(CoderFileError) as err:
        import_dictionary_learning(FIXTURES / name)
    assert REFUSED_FIXTURES[name] in str(err.value) and "mechfaith reads AutoEncoder" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("name", "change", "tensors", "message"), [
    ("topk", None, None, None),  # no config.json: AutoEncoderTopK or BatchTopKSAE?
    ("jumprelu", None, lambda t: t["threshold"].__setitem__(0, -0.1), "JumpReLU threshold -0.1 is not positive"),
    ("topk", None, lambda t: t.update(k=torch.tensor(65, dtype=torch.int)), "k = 65 is not between 1 and dict_size"),
    ("topk", None, lambda t: t.update(k=torch.tensor(4.0)), "buffer k must be one whole number"),
    ("standard", None, lambda t: t.pop("bias"), "tensor(s) missing bias"),
    ("standard", None, lambda t: t.update(extra=torch.zeros(3)), "unexpected extra"),
    ("standard", None, lambda t: t.update({"decoder.weight": torch.zeros(16, 32)}), "decoder.weight has shape (16, 32)"),
    ("standard", None, lambda t: t["bias"].__setitem__(0, float("nan")), "non-finite"),
    ("standard", lambda t: t.update(dict_size=32), None, "dict_size = 32 disagrees with ae.pt (64)"),
    ("standard", lambda t: t.update(dict_class="CrossCoder"), None, "unknown dict_class 'CrossCoder'"),
    ("standard", lambda t: t.update(dict_class="MatryoshkaBatchTopKSAE"), None, "MatryoshkaBatchTopKSAE is not"),
])
def test_other_files_are_refused_in_one_line(tmp_path, name, change, tensors, message):
    folder = _copy(tmp_path, name, change, tensors)
    if message is None:  # topk without dict_class: AutoEncoderTopK and BatchTopKSAE save the same tensors
        message = "AutoEncoderTopK and BatchTopKSAE save the same tensors"
        (folder / "config.json").unlink()
    with pytest.raises(CoderFileError) as err:
        import_dictionary_learning(folder)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_without_config_the_unambiguous_classes_are_told_by_their_tensors(tmp_path):
    for name in ("standard", "jumprelu"):
        folder = _copy(tmp_path, name)
        (folder / "config.json").unlink()
        imp = import_dictionary_learning(folder)
        assert imp.coder.cfg.activation == ACTIVATIONS[name] and imp.layer is None
        with torch.no_grad():
            torch.testing.assert_close(imp.coder(_expected(name)["x"]), _expected(name)["x_hat"], atol=1e-5, rtol=0)


class Payload:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-mechfaith-test",))


def test_only_weights_are_unpickled(tmp_path):
    folder = _copy(tmp_path, "standard")
    sd = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**sd, "evil": Payload()}, folder / "ae.pt")
    with pytest.raises(CoderFileError, match="not a state_dict torch.load\\(weights_only=True\\) can read"):
        import_dictionary_learning(folder)
    (folder / "ae.pt").write_bytes(b"not a zip")
    with pytest.raises(CoderFileError, match="weights_only"):
        import_dictionary_learning(folder)


def test_files_are_recognised(tmp_path):
    folder = FIXTURES / "topk"
    assert detect_format(folder).format == "dictionary-learning"
    assert detect_format(folder / "ae.pt").format == "dictionary-learning"
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(folder / "ae.pt", tmp_path / "checkpoints" / "ae_20.pt")
    assert detect_format(tmp_path / "checkpoints" / "ae_20.pt").format == "dictionary-learning"
    ref = open_coder(folder)
    assert ref.layer == 3 and ref.model == "EleutherAI/pythia-70m-deduped" and ref.coder.cfg.activation == "topk"


@pytest.mark.parametrize(("name", "to"), [("topk", "sparsify"), ("jumprelu", "saelens"), ("standard", "saelens"),
                                          ("batchtopk", "mechfaith")])
def test_convert_reads_dictionary_learning(tmp_path, name, to):
    r = convert(FIXTURES / name, to, tmp_path / "out")
    assert r.source_format == "dictionary-learning" and r.layer == 3
    e = _expected(name)
    back = open_coder(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(back.coder(e["x"]), e["x_hat"], atol=1e-5, rtol=0)


def test_the_readme_table_has_every_dictionary():
    text = (FIXTURES.parent.parent.parent / "README.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines()
            if line.startswith("| dictionary_learning ") and "(dictionary_learning -> mechfaith)" not in line]
    for name in READ + sorted(REFUSED_FIXTURES):
        assert any(f"`{name}`" in row for row in rows), name
    cells = [cell for row in rows for cell in row.strip("|").split(" | ")[1:]]
    assert len(cells) == 2 * len(rows) >= 12
    assert all("tested" in c or "refused: " in c or "not yet" in c for c in cells), cells
