"""SAELens's own files (tests/fixtures/saelens, written by SAELens 6 itself with
benchmarks/make_saelens_fixtures.py): every one mechfaith reads gives SAELens's latents and outputs
to 1e-5, every setting that changes the computation is honoured (reading it the other way would
be visibly wrong) or refused in one line naming it, and mechfaith's exports carry the fields SAELens
writes. Needs no SAELens."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.coders import activations as acts
from mechfaith.errors import CoderFileError
from mechfaith.lm.saelens import READ_ARCHITECTURES, REFUSED, export_saelens, import_saelens
from mechfaith.lm.saelens_format import is_saelens_6
from tests.lm.fixture_copies import edited_copy

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "saelens"
ALL = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
READ = sorted(name for name in ALL if (FIXTURES / name / "expected.safetensors").is_file())
REFUSED_FIXTURES = {
    "gated": "SAELens architecture 'gated' is not supported: separate gate",
    "abstopk": "SAELens architecture 'abstopk' is not supported",
    "matching_pursuit": "SAELens architecture 'matching_pursuit' is not supported",
    "temporal": "SAELens architecture 'temporal' is not supported",
    "standard_layer_norm": "normalize_activations = 'layer_norm' is not supported",
    "standard_expected_average": "normalize_activations = 'expected_average_only_in' is not supported",
    "standard_hook_z": "reshape_activations = 'hook_z' is not supported",
}


def _cfg(name):
    return json.loads((FIXTURES / name / "cfg.json").read_text())


def _edited(tmp_path, name, change=None, tensors=None):
    """A copy of fixture ``name`` with its cfg.json changed by ``change`` (and its tensors by ``tensors``)."""
    return edited_copy(FIXTURES / name, tmp_path / name, "sae_weights.safetensors", change, tensors)


def test_fixtures_cover_every_architecture_read_and_refused():
    assert set(READ) | set(REFUSED_FIXTURES) == set(ALL)
    archs = {_cfg(name).get("architecture", "standard") for name in READ}
    assert archs == set(READ_ARCHITECTURES)
    assert {_cfg(name)["architecture"] for name in REFUSED_FIXTURES} >= set(REFUSED)


@pytest.mark.parametrize("name", READ)
def test_fixture_gives_saelens_latents_and_outputs(name):
    e = load_file(str(FIXTURES / name / "expected.safetensors"))
    imp = import_saelens(FIXTURES / name)
    coder, x = imp.coder, e["x"]
    with torch.no_grad():
        torch.testing.assert_close(coder.encode(x), e["feature_acts"], atol=1e-5, rtol=0)
        torch.testing.assert_close(coder(x), e["output"], atol=1e-5, rtol=0)
        if "feature_acts_batch" in e:  # a BatchTopK checkpoint: SAELens's batch-level TopK too
            f, _ = acts.batchtopk(coder.encode_pre(x), coder.cfg.k)
            torch.testing.assert_close(f, e["feature_acts_batch"], atol=1e-5, rtol=0)
            torch.testing.assert_close(coder.decode(f, x), e["output_batch"], atol=1e-5, rtol=0)
    assert e["feature_acts"].count_nonzero() > 0  # the fixture exercises the latents
    arch = _cfg(name).get("architecture", "standard")
    if "transcoder" in arch:
        assert (imp.layer, imp.input_site, imp.output_site) == (3, "mlp_in_normalized", "mlp_out")
        assert coder.cfg.kind == "transcoder" and coder.cfg.skip == ("skip" in arch)
    else:
        layer = 2 if name.startswith("legacy") else 3
        assert (imp.layer, imp.input_site, imp.output_site) == (layer, "resid_pre", "resid_pre")
        assert coder.cfg.kind == "sae"
    assert imp.model_name == "gpt2"


@pytest.mark.parametrize(("name", "flag", "value"), [
    ("standard", "apply_b_dec_to_input", False),
    ("standard_no_b_dec_in", "apply_b_dec_to_input", True),
    ("topk_rescale_checkpoint", "rescale_acts_by_decoder_norm", False),
    ("batchtopk_checkpoint", "rescale_acts_by_decoder_norm", False),
    ("legacy_standard", "apply_b_dec_to_input", False),
])
def test_each_flag_is_honoured(tmp_path, name, flag, value):
    """The fixtures are sensitive to their flags: reading the flag the other way is visibly wrong."""
    e = load_file(str(FIXTURES / name / "expected.safetensors"))
    if name == "legacy_standard":  # SAELens's pre-6.0 default, when the old config has no such key
        assert flag not in _cfg(name)
    wrong = import_saelens(_edited(tmp_path, name, lambda c: c.update({flag: value}))).coder
    with torch.no_grad():
        assert (wrong(e["x"]) - e["output"]).abs().max() > 1e-2


def test_topk_threshold_is_the_batchtopk_inference_threshold():
    imp = import_saelens(FIXTURES / "batchtopk_checkpoint")
    theta = load_file(str(FIXTURES / "batchtopk_checkpoint" / "sae_weights.safetensors"))["topk_threshold"]
    assert imp.coder.cfg.activation == "batchtopk" and imp.coder.cfg.k == 4
    assert float(imp.coder.batchtopk_threshold) == pytest.approx(float(theta))


@pytest.mark.parametrize("name", sorted(REFUSED_FIXTURES))
def test_refused_fixture_is_one_line_naming_it(name):
    with pytest.raises(CoderFileError) as err:
        import_saelens(FIXTURES / name)
    text = str(err.value)
    assert REFUSED_FIXTURES[name] in text and "\n" not in text, text
    if "architecture" in REFUSED_FIXTURES[name]:
        assert "mechfaith reads standard, topk, jumprelu" in text and "jumprelu_skip_transcoder" in text


@pytest.mark.parametrize(("name", "change", "tensors", "message"), [
    ("transcoder", lambda c: c.update(apply_b_dec_to_input=True), None, "apply_b_dec_to_input is true for a transcoder"),
    ("standard", lambda c: c.update(architecture="sparse_magic"), None, "unknown SAELens architecture 'sparse_magic'"),
    ("topk", lambda c: c.update(k=2.5), None, "k = 2.5 is not a positive whole number"),
    ("legacy_standard", lambda c: c.update(activation_fn_str="tanh-relu"), None, "activation_fn 'tanh-relu'"),
    ("legacy_standard", lambda c: c.update(normalize_activations=True), None,
     "normalize_activations = 'expected_average_only_in'"),
    ("standard", lambda c: c.update(d_sae=65), None, "cfg.json says d_sae = 65, the weights have 64"),
    ("standard", None, lambda t: t.update(scaling_factor=torch.full((64,), 2.0)), "scaling_factor"),
    ("standard", None, lambda t: t.update(b_gate=torch.zeros(64)), "unexpected tensor(s) b_gate"),
    ("jumprelu", None, lambda t: t.pop("threshold"), "tensor(s) threshold missing"),
    ("skip_transcoder", None, lambda t: t.update(W_skip=t["W_skip"].T.contiguous()), "tensor W_skip has shape"),
])
def test_other_settings_are_refused_in_one_line(tmp_path, name, change, tensors, message):
    with pytest.raises(CoderFileError) as err:
        import_saelens(_edited(tmp_path, name, change, tensors))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_all_ones_scaling_factor_and_log_threshold_are_read(tmp_path):
    def older(t):
        t["scaling_factor"] = torch.ones(64)
        t["log_threshold"] = t.pop("threshold").clamp_min(1e-30).log()
    e = load_file(str(FIXTURES / "jumprelu" / "expected.safetensors"))
    coder = import_saelens(_edited(tmp_path, "jumprelu", tensors=older)).coder
    with torch.no_grad():
        torch.testing.assert_close(coder(e["x"]), e["output"], atol=1e-5, rtol=0)


def _coder(**kw):
    cfg = {"d_in": 16, "n_latents": 64, "d_out": 12, "kind": "transcoder", "activation": "relu", **kw}
    if cfg["kind"] == "sae":
        cfg["d_out"] = 16
    coder = SparseCoder(CoderConfig(**cfg), generator=torch.Generator().manual_seed(0))
    coder.batchtopk_threshold.fill_(0.2)
    return coder.eval()


@pytest.mark.parametrize(("fixture", "kw"), [
    ("standard", {"kind": "sae"}),
    ("topk", {"kind": "sae", "activation": "topk", "k": 4}),
    ("jumprelu", {"kind": "sae", "activation": "jumprelu"}),
    ("jumprelu", {"kind": "sae", "activation": "batchtopk", "k": 4}),
    ("transcoder", {}),
    ("skip_transcoder", {"skip": True}),
    ("jumprelu_transcoder", {"activation": "jumprelu"}),
    ("jumprelu_skip_transcoder", {"activation": "batchtopk", "k": 4, "skip": True}),
])
def test_export_writes_the_fields_saelens_writes(tmp_path, fixture, kw):
    ours = json.loads((export_saelens(_coder(**kw), tmp_path / "out", layer=3, model_name="gpt2") / "cfg.json")
                      .read_text())
    theirs = _cfg(fixture)
    assert set(ours) == set(theirs) and ours["architecture"] == theirs["architecture"]
    assert is_saelens_6(ours) and is_saelens_6(theirs)  # else SAELens drops the metadata
    assert set(theirs["metadata"]) - {"context_size"} <= set(ours["metadata"])
    meta = ours["metadata"]
    assert meta["model_name"] == "gpt2" and meta["hook_name"] == "blocks.3.ln2.hook_normalized"
    if "transcoder" in theirs["architecture"]:
        assert meta["hook_name_out"] == "blocks.3.hook_mlp_out"
    assert not ours["apply_b_dec_to_input"] and ours["normalize_activations"] == "none"


def test_an_older_mechfaith_topk_transcoder_export_still_reads(tmp_path):
    """mechfaith once wrote TopK transcoders as 'topk_transcoder' (SAELens has none), without
    sae_lens_version: they stay readable."""
    coder = _coder(activation="topk", k=4)
    folder = export_saelens(_coder(), tmp_path / "old", layer=2)
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["sae_lens_version"]
    cfg["metadata"]["mechfaith"]["config"].update(activation="topk", k=4)
    cfg.update(architecture="topk_transcoder", k=4)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in coder.state_dict().items() if k != "batchtopk_threshold"},
              str(folder / "sae_weights.safetensors"))
    imp = import_saelens(folder)
    assert imp.coder.cfg == coder.cfg and imp.layer == 2
    x = torch.randn(8, 16)
    with torch.no_grad():
        torch.testing.assert_close(imp.coder(x), coder(x))


def test_the_readme_table_has_every_saelens_architecture():
    text = (FIXTURES.parent.parent.parent / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().split()[0].strip("`"): line for line in text.splitlines()
            if line.startswith("| `")}
    for arch in READ_ARCHITECTURES:
        assert "| tested (" in rows[arch], arch
    for arch in REFUSED:
        assert rows[arch].count("refused: ") == 2, arch
