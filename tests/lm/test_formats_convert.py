"""Formats told from their files (detect_format, open_coder) and conversion between them
(mechfaith.lm.convert): every readable format opens, anything else is one line listing the
recognised formats, and every conversion computes what its source computes."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.coders.files import save_coder
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.coder_set import read_set, set_coder_folders
from mechfaith.lm.convert import convert
from mechfaith.lm.formats import FORMATS, detect_format
from mechfaith.lm.saelens import export_saelens
from tests.lm.test_lm_formats import LEGACY_NAME, write_legacy

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SPARSIFY = FIXTURES / "sparsify"
SAELENS = FIXTURES / "saelens"
X = torch.randn(16, 16, generator=torch.Generator().manual_seed(7))


def _coder(**kw):
    cfg = {"d_in": 16, "n_latents": 64, "kind": "transcoder", "activation": "topk", "k": 4, "skip": True, **kw}
    return SparseCoder(CoderConfig(**cfg), generator=torch.Generator().manual_seed(1)).eval()


def _same(a, b):
    x = X[:, :a.d_in]
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=0)


@pytest.fixture()
def mechfaith_coder(tmp_path):
    return save_coder(_coder(), tmp_path / "mine", training={"model": "gpt2", "layer": 2, "input_site": "mlp_in",
                                                             "output_site": "mlp_out"})


def test_every_format_is_told_from_its_files(tmp_path, mechfaith_coder):
    write_legacy(tmp_path / LEGACY_NAME)
    (tmp_path / "run_folder").mkdir()
    shutil.copytree(mechfaith_coder, tmp_path / "run_folder" / "coder")
    cases = {
        mechfaith_coder: ("mechfaith", mechfaith_coder), mechfaith_coder / "config.json": ("mechfaith", mechfaith_coder),
        tmp_path / "run_folder": ("mechfaith", tmp_path / "run_folder" / "coder"),
        SAELENS / "topk": ("saelens", SAELENS / "topk"), SAELENS / "topk" / "cfg.json": ("saelens", SAELENS / "topk"),
        SPARSIFY / "sae": ("sparsify", SPARSIFY / "sae"),
        SPARSIFY / "sae" / "sae.safetensors": ("sparsify", SPARSIFY / "sae"),
        SPARSIFY / "run": ("sparsify-run", SPARSIFY / "run"),
        tmp_path / LEGACY_NAME: ("gpt2-pt", tmp_path / LEGACY_NAME),
    }
    for path, (fmt, where) in cases.items():
        found = detect_format(path)
        assert (found.format, found.path) == (fmt, where), path


def test_a_sparsify_folder_is_no_longer_read_as_a_saelens_one():
    ref = open_coder(SPARSIFY / "transcoder")
    assert ref.coder.cfg.kind == "transcoder" and ref.coder.cfg.activation == "topk"


@pytest.mark.parametrize(("files", "message"), [
    ({}, "not a coder in a format mechfaith reads"),
    ({"notes.txt": "hello"}, "not a coder in a format mechfaith reads"),
    ({"cfg.json": "{}"}, "not a coder in a format mechfaith reads"),
    ({"cfg.json": '{"d_in": 16, "num_latents": 64, "k": 4}'}, "sae.safetensors: file not found"),
    ({"cfg.json": '{"architecture": "standard", "d_in": 16, "d_sae": 64}'}, "sae_weights.safetensors: file not found"),
])
def test_anything_else_is_one_line_listing_the_formats(tmp_path, files, message):
    folder = tmp_path / "thing"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(CoderFileError) as err:
        open_coder(folder)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    if "format mechfaith reads" in message:
        assert all(desc in text for desc in FORMATS.values())


def test_a_set_or_run_is_not_one_coder():
    with pytest.raises(CoderFileError, match="this is a sparsify run .* give one of its coder folders"):
        open_coder(SPARSIFY / "run")


@pytest.mark.parametrize("to", ["mechfaith", "saelens", "sparsify"])
@pytest.mark.parametrize("source", ["mechfaith", "mechfaith_relu", "saelens", "sparsify", "gpt2-pt"])
def test_one_coder_converts_to_every_format(tmp_path, mechfaith_coder, source, to):
    src = {"mechfaith": mechfaith_coder, "mechfaith_relu": tmp_path / "relu", "saelens": tmp_path / "saelens",
           "sparsify": SPARSIFY / "skip_transcoder", "gpt2-pt": tmp_path / LEGACY_NAME}[source]
    if source == "saelens":
        export_saelens(_coder(activation="relu"), src, layer=2, model_name="gpt2")
    elif source == "mechfaith_relu":
        save_coder(_coder(activation="relu", skip=False), src,
                   training={"layer": 1, "input_site": "resid_pre", "output_site": "mlp_out"})
    elif source == "gpt2-pt":
        write_legacy(src, d=16)
    original = open_coder(src)
    if to == "saelens" and original.coder.cfg.activation == "topk":  # SAELens has no TopK transcoder
        with pytest.raises(ConfigError, match="SAELens has no TopK transcoder"):
            convert(src, to, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    if to == "sparsify" and original.coder.cfg.activation != "topk":
        with pytest.raises(ConfigError, match="sparsify has TopK coders only"):
            convert(src, to, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    r = convert(src, to, tmp_path / "out")
    assert detect_format(tmp_path / "out").format == to and r.source_format == source.split("_")[0]
    back = open_coder(tmp_path / "out")
    _same(back.coder, original.coder)
    assert (back.layer, back.input_site, back.output_site) == (original.layer, original.input_site, original.output_site)
    convert(src, to, tmp_path / "out")  # a conversion of the same kind is replaced whole


def test_a_run_converts_to_a_mechfaith_set_and_back(tmp_path):
    run = SPARSIFY / "run"
    r = convert(run, "mechfaith", tmp_path / "set")
    assert sorted(r.folders) == [0, 1] and detect_format(tmp_path / "set").format == "mechfaith-set"
    manifest = read_set(tmp_path / "set")  # a valid mechfaith set
    assert manifest.model == "HuggingFaceTB/SmolLM2-135M" and manifest.runs[0].status == "imported"
    convert(tmp_path / "set", "sparsify", tmp_path / "run2")
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == ["layers.0.mlp", "layers.1.mlp"]
    for l in (0, 1):
        _same(open_coder(tmp_path / "run2" / f"layers.{l}.mlp").coder, open_coder(run / f"layers.{l}.mlp").coder)
        _same(open_coder(set_coder_folders(tmp_path / "set")[l]).coder, open_coder(run / f"layers.{l}.mlp").coder)
    with pytest.raises(ConfigError, match="layer 0: SAELens has no TopK transcoder"):
        convert(run, "saelens", tmp_path / "saelens")
    assert not (tmp_path / "saelens").exists()


@pytest.mark.parametrize(("to", "message"), [("dictionary-learning", "--to dictionary-learning: not yet supported"),
                                              ("circuit-tracer", "is one coder; circuit-tracer reads sets")])
def test_formats_not_written_from_one_coder_say_so(tmp_path, mechfaith_coder, to, message):
    with pytest.raises(ConfigError, match=message):
        convert(mechfaith_coder, to, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_is_guarded(tmp_path, mechfaith_coder):
    with pytest.raises(ConfigError, match="overlaps the source"):
        convert(mechfaith_coder, "mechfaith", mechfaith_coder)
    with pytest.raises(ConfigError, match="overlaps the source"):
        convert(mechfaith_coder, "sparsify", mechfaith_coder / "inside")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty folder"):
        convert(mechfaith_coder, "sparsify", other)
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        convert(mechfaith_coder, "sparsify", tmp_path / "file")
    convert(mechfaith_coder, "sparsify", tmp_path / "sp")
    with pytest.raises(ConfigError, match="not an empty folder"):  # a sparsify folder is not a mechfaith one's
        convert(mechfaith_coder, "mechfaith", tmp_path / "sp")
    assert json.loads((tmp_path / "sp" / "cfg.json").read_text())["transcode"] is True
