"""circuit-tracer cross-layer transcoders (tests/fixtures/circuit_tracer_clt: CLT files written by
circuit-tracer 0.5.0 itself, with what its load_clt computes from them; from_mechfaith/: a mechfaith
CLT and what circuit-tracer computed from mechfaith's export of it; all by
benchmarks/make_circuit_tracer_clt_fixtures.py): read to 1e-5, written and read back identically,
refused in one line where circuit-tracer cannot hold or mechfaith cannot compute. Needs no circuit-tracer."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mechfaith.cli.main import main
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.coders.clt_files import load_clt, save_clt
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.lm.circuit_tracer import read_circuit_tracer_set
from mechfaith.lm.circuit_tracer_clt import export_circuit_tracer_clt, is_circuit_tracer_clt, read_circuit_tracer_clt
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.convert import convert
from mechfaith.lm.formats import Detected, detect_format

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "circuit_tracer_clt"
NAMES = ["jumprelu", "relu"]


def _clt(seed=0, **kw):
    cfg = CLTConfig(**{"n_layers": 3, "d_in": 16, "n_latents": 32, "activation": "jumprelu", "k": 4, **kw})
    clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in clt.named_parameters():
            if name == "log_threshold":
                p.copy_((torch.rand(p.shape, generator=g) * 0.3 + 0.05).log())
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return clt.eval()


def _same(a: CrossLayerTranscoder, b: CrossLayerTranscoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for f in ("n_layers", "d_in", "n_latents", "d_out", "first_layer", "reach", "activation", "skip"):
        assert getattr(a.cfg, f) == getattr(b.cfg, f), f


def test_fixtures_are_circuit_tracers_layout():
    for name in NAMES:
        files = sorted(p.name for p in (FIXTURES / name).iterdir())
        assert files == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                         "W_enc_1.safetensors", "W_enc_2.safetensors", "config.yaml", "expected.safetensors"]
    enc = {n: load_file(str(FIXTURES / n / "W_enc_1.safetensors")) for n in NAMES}
    assert set(enc["relu"]) == {"W_enc_1", "b_enc_1", "b_dec_1"} and set(enc["jumprelu"]) == set(enc["relu"]) | {"threshold_1"}
    assert enc["relu"]["W_enc_1"].shape == (32, 16)
    assert load_file(str(FIXTURES / "relu" / "W_dec_1.safetensors"))["W_dec_1"].shape == (32, 2, 16)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_gives_circuit_tracers_features_and_reconstruction(name):
    e = load_file(str(FIXTURES / name / "expected.safetensors"))
    c = read_circuit_tracer_clt(FIXTURES / name)
    cfg = c.clt.cfg
    assert (cfg.n_layers, cfg.d_in, cfg.n_latents, cfg.d_out, cfg.reach, cfg.skip) == (3, 16, 32, 16, None, False)
    assert cfg.activation == name and cfg.first_layer == 0
    assert (c.model_name, c.feature_input_hook, c.feature_output_hook, c.scan) == \
        ("HuggingFaceTB/SmolLM2-135M", "hook_resid_mid", "hook_mlp_out", f"fixture/{name}")
    assert (c.input_site, c.output_site) == ("resid_mid", "mlp_out")
    with torch.no_grad():
        torch.testing.assert_close(c.clt.encode(e["x"]), e["features"], atol=1e-5, rtol=0)
        torch.testing.assert_close(c.clt(e["x"]), e["reconstruction"], atol=1e-5, rtol=0)
    assert 0 < int(e["features"].count_nonzero()) < e["features"].numel()


def test_without_config_the_files_are_read(tmp_path):
    folder = shutil.copytree(FIXTURES / "jumprelu", tmp_path / "clt")
    (folder / "config.yaml").unlink()
    assert is_circuit_tracer_clt(folder)
    c = read_circuit_tracer_clt(folder)
    assert c.model_name is None and c.input_site is None and c.clt.n_layers == 3


@pytest.mark.parametrize("name", NAMES)
def test_circuit_tracers_files_written_back_are_its_own(tmp_path, name):
    """Read, written, read: the same CLT; the written tensors are circuit-tracer's (thresholds to float32
    rounding of exp(log t)), plus the exact log-thresholds."""
    c = read_circuit_tracer_clt(FIXTURES / name)
    export_circuit_tracer_clt(c.clt, tmp_path / "ct", model_name=c.model_name, input_site=c.input_site,
                              output_site=c.output_site, scan=c.scan)
    again = read_circuit_tracer_clt(tmp_path / "ct")
    _same(c.clt, again.clt)
    assert (again.model_name, again.feature_input_hook, again.feature_output_hook, again.scan) == \
        (c.model_name, c.feature_input_hook, c.feature_output_hook, c.scan)
    for f in (p.name for p in (FIXTURES / name).glob("W_*.safetensors")):
        theirs, ours = load_file(str(FIXTURES / name / f)), load_file(str(tmp_path / "ct" / f))
        assert set(ours) == set(theirs) | {k.replace("threshold", "log_threshold") for k in theirs if "threshold" in k}
        for k, t in theirs.items():
            if k.startswith("threshold"):
                torch.testing.assert_close(ours[k], t, rtol=1e-6, atol=0)
            else:
                assert torch.equal(ours[k], t), (f, k)


@pytest.mark.parametrize("kw", [{}, {"activation": "relu"}, {"reach": 1}, {"reach": 0, "activation": "relu"},
                                {"reach": 5}])
def test_mechfaith_clt_written_then_read_is_identical(tmp_path, kw):
    clt = _clt(3, **kw)
    export_circuit_tracer_clt(clt, tmp_path / "ct", model_name="gpt2")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder" and config["model_name"] == "gpt2"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    assert config.get("mechfaith_reach") == kw.get("reach")
    w_dec_0 = load_file(str(tmp_path / "ct" / "W_dec_0.safetensors"))["W_dec_0"]
    assert w_dec_0.shape == (32, 3, 16)  # every later layer, zeros beyond the reach
    if kw.get("reach") == 0:
        assert not w_dec_0[:, 1:].any()
    back = read_circuit_tracer_clt(tmp_path / "ct")
    _same(clt, back.clt)
    assert (back.input_site, back.output_site) == ("mlp_in", "mlp_out")
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back.clt(x), clt(x))
    export_circuit_tracer_clt(clt, tmp_path / "ct")  # written before: replaced whole


def test_circuit_tracer_computes_what_mechfaith_computes():
    """from_mechfaith/: circuit-tracer's load_clt on mechfaith's export of this CLT computed these."""
    clt = load_clt(FIXTURES / "from_mechfaith" / "mechfaith")
    e = load_file(str(FIXTURES / "from_mechfaith" / "expected.safetensors"))
    assert clt.cfg.reach == 1 and clt.cfg.activation == "jumprelu"
    with torch.no_grad():
        torch.testing.assert_close(clt.encode(e["x"]), e["features"], atol=1e-5, rtol=0)
        torch.testing.assert_close(clt(e["x"]), e["reconstruction"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kw", "message"), [
    ({"activation": "topk"}, "a topk CLT: circuit-tracer's CLT has ReLU and JumpReLU latents only"),
    ({"skip": True}, "with a skip: circuit-tracer's CLT files hold no skip connection"),
    ({"d_out": 12}, "maps 16 to 12 dimensions"),
    ({"first_layer": 2}, "over layers 2..4: circuit-tracer reads W_enc_<i> as the model's layer i"),
])
def test_export_refuses_what_circuit_tracer_cannot_hold(tmp_path, kw, message):
    with pytest.raises(ConfigError) as err:
        export_circuit_tracer_clt(_clt(**kw), tmp_path / "ct")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists()


def test_export_refuses_sites_without_a_hook_and_a_foreign_folder(tmp_path):
    with pytest.raises(ConfigError, match="no hook for resid_pre -> resid_post"):
        export_circuit_tracer_clt(_clt(), tmp_path / "ct", input_site="resid_pre", output_site="resid_post")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a circuit-tracer CLT's"):
        export_circuit_tracer_clt(_clt(), tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _edited(tmp_path, name="jumprelu", config=None, file=None, tensors=None):
    folder = shutil.copytree(FIXTURES / name, tmp_path / "clt")
    if config:
        data = yaml.safe_load((folder / "config.yaml").read_text())
        config(data)
        (folder / "config.yaml").write_text(yaml.safe_dump(data))
    if tensors:
        t = load_file(str(folder / file))
        tensors(t)
        save_file(t, str(folder / file))
    return folder


def _remove(name):
    return lambda folder: (folder / name).unlink()


@pytest.mark.parametrize(("config", "file", "tensors", "message"), [
    (lambda c: c.update(model_kind="transcoder_set"), None, None, "model_kind 'transcoder_set' is not supported"),
    (lambda c: c.update(feature_input_hook=3), None, None, "'feature_input_hook' must be"),
    (lambda c: c.update(mechfaith_reach=-1), None, None, "mechfaith_reach must be an integer >= 0"),
    (lambda c: c.update(mechfaith_reach=0), None, None, "W_dec_0 writes beyond mechfaith_reach = 0"),
    (None, "W_enc_1.safetensors", lambda t: t.pop("b_dec_1"), "tensor(s) missing b_dec_1"),
    (None, "W_enc_1.safetensors", lambda t: t.update(W_skip_1=torch.zeros(16, 16)), "unexpected W_skip_1"),
    (None, "W_enc_1.safetensors", lambda t: t.update(W_enc_1=torch.zeros(32, 12)), "tensor W_enc_1 has shape (32, 12)"),
    (None, "W_enc_2.safetensors", lambda t: t["threshold_2"].__setitem__(3, -0.5), "JumpReLU threshold -0.5 is not posi"),
    (None, "W_enc_2.safetensors", lambda t: t.update(log_threshold_2=t["threshold_2"] * 0), "log_threshold_2 and thr"),
    (None, "W_enc_0.safetensors", lambda t: t["b_enc_0"].__setitem__(0, float("nan")), "non-finite"),
    (None, "W_enc_0.safetensors", lambda t: t.update(b_enc_0=t["b_enc_0"].int()), "dtype int32"),
    (None, "W_dec_1.safetensors", lambda t: t.update(W_dec_1=t["W_dec_1"][:, :1].contiguous()),
     "tensor W_dec_1 has shape (32, 1, 16)"),
])
def test_damaged_clts_are_refused_in_one_line(tmp_path, config, file, tensors, message):
    folder = _edited(tmp_path, config=config, file=file, tensors=tensors)
    with pytest.raises(CoderFileError) as err:
        read_circuit_tracer_clt(folder)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize(("edit", "message"), [
    (_remove("W_dec_2.safetensors"), "W_dec_<i>.safetensors missing for layers [2]"),
    (_remove("W_enc_1.safetensors"), "encoder layers [0, 2]: circuit-tracer needs W_enc_<i>.safetensors for every"),
    (lambda f: shutil.copy(f / "W_dec_2.safetensors", f / "W_dec_7.safetensors"), "without an encoder: [7]"),
    (lambda f: (f / "W_enc_0.safetensors").write_bytes(b"garbage"), "not a readable safetensors file"),
])
def test_missing_or_broken_files_are_refused_in_one_line(tmp_path, edit, message):
    folder = shutil.copytree(FIXTURES / "relu", tmp_path / "clt")
    edit(folder)
    with pytest.raises(CoderFileError) as err:
        read_circuit_tracer_clt(folder)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_clts_are_recognised_and_not_read_as_coders_or_sets(tmp_path):
    folder = FIXTURES / "jumprelu"
    for p in (folder, folder / "config.yaml", folder / "W_enc_1.safetensors", folder / "W_dec_0.safetensors"):
        assert detect_format(p) == Detected("circuit-tracer-clt", folder)
    ours = FIXTURES / "from_mechfaith" / "mechfaith"
    for p in (ours, ours / "config.json", ours / "weights.safetensors"):
        assert detect_format(p) == Detected("mechfaith-clt", ours)
    for p in (folder, ours):
        with pytest.raises(CoderFileError, match="cross-layer transcoder .*, not one coder"):
            open_coder(p)
    with pytest.raises(CoderFileError, match="model_kind 'cross_layer_transcoder' is not supported"):
        read_circuit_tracer_set(folder)


@pytest.mark.parametrize("name", NAMES)
def test_convert_a_circuit_tracer_clt_and_back(tmp_path, name):
    e = load_file(str(FIXTURES / name / "expected.safetensors"))
    r = convert(FIXTURES / name, "mechfaith", tmp_path / "ours")
    assert r.source_format == "circuit-tracer-clt" and r.kind.startswith(f"{name} cross-layer transcoder")
    ours = load_clt(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(ours(e["x"]), e["reconstruction"], atol=1e-5, rtol=0)
    back = convert(tmp_path / "ours", "circuit-tracer", tmp_path / "ct")
    assert back.source_format == "mechfaith-clt"
    c = read_circuit_tracer_clt(tmp_path / "ct")
    _same(ours, c.clt)
    assert (c.model_name, c.feature_input_hook, c.feature_output_hook) == \
        ("HuggingFaceTB/SmolLM2-135M", "hook_resid_mid", "hook_mlp_out")
    convert(FIXTURES / name, "circuit-tracer", tmp_path / "ct2")
    _same(ours, read_circuit_tracer_clt(tmp_path / "ct2").clt)


def test_a_clt_run_folder_converts(tmp_path):
    clt = _clt(7, reach=1)
    save_clt(clt, tmp_path / "run" / "clt", training={"model": "gpt2", "input_site": "mlp_in", "output_site": "mlp_out"})
    assert detect_format(tmp_path / "run") == Detected("mechfaith-clt", tmp_path / "run" / "clt")
    r = convert(tmp_path / "run", "circuit-tracer", tmp_path / "ct")
    assert r.source_format == "mechfaith-clt"
    c = read_circuit_tracer_clt(tmp_path / "ct")
    _same(clt, c.clt)
    assert (c.model_name, c.feature_input_hook, c.feature_output_hook) == ("gpt2", "mlp.hook_in", "hook_mlp_out")


def test_convert_cli_refuses_in_one_line_with_exit_2(tmp_path, capsys):
    save_clt(_clt(skip=True), tmp_path / "skip")
    assert main(["convert", str(tmp_path / "skip"), "--to", "circuit-tracer", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip()
    assert "circuit-tracer's CLT files hold no skip connection" in err and "\n" not in err
    assert main(["convert", str(FIXTURES / "relu"), "--to", "saelens", "--out", str(tmp_path / "sl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a cross-layer transcoder, which saelens files cannot hold" in err and "\n" not in err
    assert not (tmp_path / "ct").exists() and not (tmp_path / "sl").exists()
    assert main(["convert", str(FIXTURES / "relu"), "--to", "mechfaith", "--out", str(tmp_path / "ok")]) == 0
    assert "relu cross-layer transcoder over 3 layers" in capsys.readouterr().out
