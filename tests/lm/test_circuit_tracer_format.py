"""circuit-tracer per-layer transcoder sets (tests/fixtures/circuit_tracer: layer files written by
circuit-tracer 0.5.0 itself, config.yaml written by benchmarks/make_circuit_tracer_fixtures.py with
the fields circuit-tracer's load_transcoders reads, outputs computed by the set circuit-tracer loaded
from it): read to 1e-5, written with the tensors and orientation circuit-tracer writes, refused in
one line where circuit-tracer cannot hold or mechfaith cannot compute. Needs no circuit-tracer."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.lm.circuit_tracer import export_circuit_tracer_set, is_circuit_tracer_set, read_circuit_tracer_set
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.coder_set import read_set, set_coder_folders
from mechfaith.lm.convert import convert
from mechfaith.lm.formats import Detected, detect_format

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "circuit_tracer"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def _coder(seed=0, **kw):
    cfg = {"d_in": 16, "n_latents": 64, "kind": "transcoder", "activation": "relu", "k": 4, **kw}
    coder = SparseCoder(CoderConfig(**cfg), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            if name == "log_threshold":
                p.copy_((torch.rand(p.shape, generator=g) * 0.5 + 0.05).log())
            else:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        coder.batchtopk_threshold.fill_(0.3)
    return coder.eval()


def test_fixtures_cover_relu_and_jumprelu_with_skip():
    assert NAMES == ["jumprelu_skip", "relu"]
    keys = {n: set(load_file(str(FIXTURES / n / "layer_0.safetensors"))) for n in NAMES}
    assert keys["relu"] == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert keys["jumprelu_skip"] == keys["relu"] | {"activation_function.threshold", "W_skip"}


@pytest.mark.parametrize("name", NAMES)
def test_fixture_gives_circuit_tracer_features_and_outputs(name):
    e = load_file(str(FIXTURES / name / "expected.safetensors"))
    s = read_circuit_tracer_set(FIXTURES / name)
    assert sorted(s.coders) == [0, 1] and s.model_name == "HuggingFaceTB/SmolLM2-135M"
    assert (s.feature_input_hook, s.feature_output_hook, s.scan) == ("mlp.hook_in", "mlp.hook_out", f"fixture/{name}")
    for layer, imp in s.coders.items():
        with torch.no_grad():
            torch.testing.assert_close(imp.coder.encode(e["x"]), e[f"features_{layer}"], atol=1e-5, rtol=0)
            torch.testing.assert_close(imp.coder(e["x"]), e[f"out_{layer}"], atol=1e-5, rtol=0)
        assert 0 < int(e[f"features_{layer}"].count_nonzero()) < e[f"features_{layer}"].numel()
        cfg = imp.coder.cfg
        assert (cfg.kind, cfg.activation, cfg.skip) == \
            ("transcoder", "jumprelu" if name == "jumprelu_skip" else "relu", name == "jumprelu_skip")
        assert (imp.layer, imp.input_site, imp.output_site) == (layer, "mlp_in", "mlp_out")


def test_without_config_the_layer_files_are_read(tmp_path):
    folder = shutil.copytree(FIXTURES / "relu", tmp_path / "set")
    (folder / "config.yaml").unlink()
    assert is_circuit_tracer_set(folder)
    s = read_circuit_tracer_set(folder)
    assert sorted(s.coders) == [0, 1] and s.model_name is None and s.coders[0].input_site is None


@pytest.mark.parametrize("kw", [{}, {"skip": True}, {"activation": "jumprelu"}, {"activation": "jumprelu", "skip": True},
                                {"activation": "batchtopk"}])
def test_export_then_read_gives_the_same_set(tmp_path, kw):
    coders = {l: _coder(10 + l, **kw) for l in range(3)}
    written = export_circuit_tracer_set(coders, tmp_path / "set", model_name="gpt2")
    assert sorted(written) == [0, 1, 2] and all(p.is_file() for p in written.values())
    theirs = set(load_file(str(FIXTURES / ("jumprelu_skip" if kw else "relu") / "layer_0.safetensors")))
    ours = load_file(str(written[0]))
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"W_skip"} if kw.get("skip") else set()) | \
        ({"activation_function.threshold"} if kw.get("activation") else set())
    assert set(ours) == expected and expected <= theirs | {"activation_function.threshold"}
    assert ours["W_enc"].shape == (64, 16) and ours["W_dec"].shape == (64, 16)
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "gpt2"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert config["transcoders"] == [str(written[l].resolve()) for l in range(3)]
    back = read_circuit_tracer_set(tmp_path / "set")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for l, coder in coders.items():
            torch.testing.assert_close(back.coders[l].coder(x), coder(x), atol=1e-6, rtol=0)
            torch.testing.assert_close(back.coders[l].coder.encode(x), coder.encode(x), atol=1e-6, rtol=0)
    export_circuit_tracer_set(coders, tmp_path / "set", model_name="gpt2")  # written before: replaced whole


@pytest.mark.parametrize(("coders", "message"), [
    ({0: {"activation": "topk"}}, "layer 0: a topk transcoder: circuit-tracer's per-layer loader reads ReLU and JumpReLU"),
    ({0: {"kind": "sae"}}, "a circuit-tracer set holds transcoders"),
    ({0: {"d_out": 12}}, "maps 16 to 12 dimensions"),
    ({0: {}, 2: {}}, "layers [0, 2]: a circuit-tracer set needs a transcoder for every layer from 0"),
    ({0: {}, 1: {"n_latents": 32}}, "one d_transcoder"),
    ({0: {}, 1: {"skip": True}}, "the same skip connection"),
])
def test_export_refuses_what_circuit_tracer_cannot_load(tmp_path, coders, message):
    with pytest.raises(ConfigError) as err:
        export_circuit_tracer_set({l: _coder(l, **kw) for l, kw in coders.items()}, tmp_path / "set")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "set").exists()


def test_export_refuses_sites_it_has_no_hook_for(tmp_path):
    with pytest.raises(ConfigError, match="no hook for resid_pre -> resid_post"):
        export_circuit_tracer_set({0: _coder()}, tmp_path / "set", input_site="resid_pre", output_site="resid_post")


def _edited(tmp_path, config=None, tensors=None):
    folder = shutil.copytree(FIXTURES / "jumprelu_skip", tmp_path / "set")
    if config:
        data = yaml.safe_load((folder / "config.yaml").read_text())
        config(data)
        (folder / "config.yaml").write_text(yaml.safe_dump(data))
    if tensors:
        t = load_file(str(folder / "layer_1.safetensors"))
        tensors(t)
        save_file(t, str(folder / "layer_1.safetensors"))
    return folder


@pytest.mark.parametrize(("config", "tensors", "message"), [
    (lambda c: c.update(model_kind="cross_layer_transcoder"), None, "model_kind 'cross_layer_transcoder' is not supp"),
    (lambda c: c.update(transcoders=["hf://mwhanna/x/layer_0.safetensors"]), None, "is on the Hugging Face Hub"),
    (lambda c: c.update(transcoders=["layer_1.safetensors"]), None, None),
    (lambda c: c.update(feature_input_hook=3), None, "'feature_input_hook' must be"),
    (None, lambda t: t.pop("b_dec"), "tensor(s) missing b_dec"),
    (None, lambda t: t.update(W_extra=torch.zeros(2)), "unexpected W_extra"),
    (None, lambda t: t.update(W_skip=torch.zeros(16, 12)), "tensor W_skip has shape (16, 12)"),
    (None, lambda t: t["activation_function.threshold"].__setitem__(3, -0.5), "JumpReLU threshold -0.5 is not posit"),
    (None, lambda t: t["b_enc"].__setitem__(0, float("inf")), "non-finite"),
])
def test_other_sets_are_refused_in_one_line(tmp_path, config, tensors, message):
    folder = _edited(tmp_path, config, tensors)
    if message is None:  # a one-layer set (layer_1's file as layer 0) is a set; missing layers are not
        assert sorted(read_circuit_tracer_set(folder).coders) == [0]
        (folder / "config.yaml").unlink()
        (folder / "layer_0.safetensors").unlink()
        message = "layers [1]: circuit-tracer needs one transcoder for every layer from 0"
    with pytest.raises(CoderFileError) as err:
        read_circuit_tracer_set(folder)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_readme_table_has_every_circuit_tracer_kind():
    text = (FIXTURES.parent.parent.parent / "README.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines()
            if line.startswith("| circuit-tracer ") and "(circuit-tracer -> mechfaith)" not in line]
    for name in NAMES:
        assert any(f"`{name}`" in row for row in rows), name
    cells = [cell for row in rows for cell in row.strip("|").split(" | ")[1:]]
    assert len(cells) == 2 * len(rows) >= 8
    # every cell tested, refused with its reason, or not yet; "(...)": no such thing on that side
    assert all("tested" in c or "refused: " in c or "not yet" in c or c.startswith("(") for c in cells), cells
    assert "NOT written by circuit-tracer" in text


def test_sets_and_layer_files_are_recognised():
    folder = FIXTURES / "jumprelu_skip"
    assert detect_format(folder) == Detected("circuit-tracer", folder)
    assert detect_format(folder / "config.yaml") == Detected("circuit-tracer", folder)
    assert detect_format(folder / "layer_1.safetensors") == Detected("circuit-tracer-layer", folder / "layer_1.safetensors")
    ref = open_coder(folder / "layer_1.safetensors")
    assert (ref.layer, ref.input_site, ref.output_site, ref.model) == (1, "mlp_in", "mlp_out", "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(CoderFileError, match="this is a circuit-tracer transcoder set"):
        open_coder(folder)


def _check_set(layers, expected):
    with torch.no_grad():
        for l, coder in layers.items():
            torch.testing.assert_close(coder(expected["x"]), expected[f"out_{l}"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_convert_a_circuit_tracer_set_and_back(tmp_path, name):
    e = load_file(str(FIXTURES / name / "expected.safetensors"))
    r = convert(FIXTURES / name, "mechfaith", tmp_path / "set")
    assert r.source_format == "circuit-tracer" and sorted(r.folders) == [0, 1]
    manifest = read_set(tmp_path / "set")
    assert manifest.layers == [0, 1] and manifest.model == "HuggingFaceTB/SmolLM2-135M"
    assert (manifest.input_site, manifest.output_site) == ("mlp_in", "mlp_out")
    _check_set({l: open_coder(p).coder for l, p in set_coder_folders(tmp_path / "set").items()}, e)
    convert(FIXTURES / name, "saelens", tmp_path / "saelens")
    _check_set({l: open_coder(tmp_path / "saelens" / f"L{l}").coder for l in (0, 1)}, e)
    back = convert(tmp_path / "set", "circuit-tracer", tmp_path / "ct")
    assert back.source_format == "mechfaith-set"
    _check_set({l: c.coder for l, c in read_circuit_tracer_set(tmp_path / "ct").coders.items()}, e)
    again = convert(FIXTURES / name, "circuit-tracer", tmp_path / "ct2")
    assert sorted(again.folders) == [0, 1]
    _check_set({l: c.coder for l, c in read_circuit_tracer_set(tmp_path / "ct2").coders.items()}, e)


def test_convert_refuses_a_set_circuit_tracer_cannot_load(tmp_path):
    run = FIXTURES.parent / "sparsify" / "run"  # TopK skip transcoders
    with pytest.raises(ConfigError, match="layer 0: a topk transcoder"):
        convert(run, "circuit-tracer", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(ConfigError, match="layer 0: sparsify has TopK coders only: a relu transcoder"):
        convert(FIXTURES / "relu", "sparsify", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_circuit_tracer_set_is_a_set_for_every_command(capsys):
    from mechfaith.circuits.session import load_transcoders
    from mechfaith.cli.main import main
    from mechfaith.lm.coder_set import is_coder_set, read_set, set_coder_folders

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "circuit_tracer" / "jumprelu_skip"
    assert is_coder_set(folder)
    manifest = read_set(folder)
    assert manifest.layers == [0, 1] and set(set_coder_folders(folder)) == {0, 1}
    tcs, model = load_transcoders([str(folder)])  # what circuit, graph and dashboard read
    assert sorted(tcs) == [0, 1] and tcs[1].coder.cfg.activation == "jumprelu" and tcs[1].coder.W_skip is not None
    assert main(["inspect", str(folder)]) == 0
    assert "(circuit-tracer set: 2 layers" in capsys.readouterr().out
