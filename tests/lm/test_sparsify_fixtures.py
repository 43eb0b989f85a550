"""sparsify's own files (tests/fixtures/sparsify, written by sparsify 1.3 itself with
benchmarks/make_sparsify_fixtures.py): every one mechfaith reads gives sparsify's latents and
outputs to 1e-5, every flag that changes the computation is honoured (reading it the other way would
be visibly wrong) or refused in one line naming it, a run reads as a set of layers, and mechfaith's
exports have the fields and tensors sparsify writes. Needs no sparsify."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.errors import CoderFileError, ConfigError, InputError
from mechfaith.lm.coder_files import CoderRef
from mechfaith.lm.coder_set import is_coder_set, read_set, set_coder_folders, summarize_set
from mechfaith.lm.sparsify import (
    export_set_sparsify,
    export_sparsify,
    hookpoint_for,
    import_sparsify,
    parse_hookpoint,
    read_sparsify_run,
)
from tests.lm.fixture_copies import edited_copy

torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sparsify"
RUN = FIXTURES / "run"
READ = sorted(p.name for p in FIXTURES.iterdir() if (p / "expected.safetensors").is_file())
READ_ALL = READ + [f"run/{p.name}" for p in sorted(RUN.iterdir()) if (p / "expected.safetensors").is_file()]
REFUSED_FIXTURES = {"groupmax": "activation 'groupmax' is not supported: the largest latent of each of k groups"}


def _cfg(name):
    return json.loads((FIXTURES / name / "cfg.json").read_text())


def _edited(tmp_path, name, change=None, tensors=None):
    """A copy of fixture ``name`` with its cfg.json changed by ``change`` (and its tensors by ``tensors``)."""
    return edited_copy(FIXTURES / name, tmp_path / Path(name).name, "sae.safetensors", change, tensors)


def _dense(e, n):
    return torch.zeros(e["x"].shape[0], n).scatter(-1, e["latent_indices"], e["latent_acts"])


def test_fixtures_cover_every_kind_and_flag():
    dirs = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
    assert set(dirs) == set(READ) | set(REFUSED_FIXTURES) | {"run"}
    cfgs = [_cfg(name) for name in READ_ALL]
    for flag in ("transcode", "skip_connection", "multi_topk"):
        assert {c[flag] for c in cfgs} == {True, False}, flag
    assert any(c["transcode"] and c["skip_connection"] for c in cfgs)
    assert any(c["num_latents"] == 0 for c in cfgs)  # sized by expansion_factor
    assert {_cfg(name)["activation"] for name in REFUSED_FIXTURES} == {"groupmax"}


@pytest.mark.parametrize("name", READ_ALL)
def test_fixture_gives_sparsify_latents_and_outputs(name):
    e = load_file(str(FIXTURES / name / "expected.safetensors"))
    imp = import_sparsify(FIXTURES / name)
    coder, x = imp.coder, e["x"]
    with torch.no_grad():
        torch.testing.assert_close(coder.encode(x), _dense(e, coder.n_latents), atol=1e-5, rtol=0)
        torch.testing.assert_close(coder(x), e["sae_out"], atol=1e-5, rtol=0)
        ours = coder.encode(x).topk(coder.cfg.k, dim=-1).indices.sort(dim=-1).values
    torch.testing.assert_close(ours, e["latent_indices"].sort(dim=-1).values)  # the same latents
    assert e["latent_acts"].count_nonzero() > 0
    cfg = _cfg(name)
    assert coder.cfg.activation == "topk" and coder.cfg.k == cfg["k"] and coder.n_latents == 64
    assert coder.cfg.kind == ("transcoder" if cfg["transcode"] else "sae")
    assert coder.cfg.skip == cfg["skip_connection"] and coder.d_out == coder.d_in == 16
    assert coder.cfg.decoder_norm == ("penalty" if cfg["transcode"] else "unit")  # sparsify's training
    if name.startswith("run/"):
        layer = int(name.split(".")[1])
        assert (imp.layer, imp.input_site, imp.output_site) == (layer, "mlp_in", "mlp_out")
    else:  # a folder not named by a hookpoint: no layer
        assert (imp.layer, imp.input_site, imp.output_site, imp.model_name) == (None, None, None, None)


@pytest.mark.parametrize(("name", "flag", "value"), [
    ("sae", "transcode", True),  # then b_dec is not subtracted from the input
    ("transcoder", "transcode", False),  # then it is
    ("sae_skip", "transcode", True),
])
def test_each_flag_is_honoured(tmp_path, name, flag, value):
    e = load_file(str(FIXTURES / name / "expected.safetensors"))
    wrong = import_sparsify(_edited(tmp_path, name, lambda c: c.update({flag: value}))).coder
    with torch.no_grad():
        assert (wrong(e["x"]) - e["sae_out"]).abs().max() > 1e-2


def test_multi_topk_reads_as_its_topk_k_coder():
    """multi_topk is a training loss: the coder is sparsify's encode -> decode at k."""
    assert _cfg("sae_multi_topk")["multi_topk"] is True
    coder = import_sparsify(FIXTURES / "sae_multi_topk").coder
    assert coder.cfg.k == 4
    with torch.no_grad():
        assert int((coder.encode(load_file(str(FIXTURES / "sae_multi_topk" / "expected.safetensors"))["x"]) > 0)
                   .sum(-1).max()) <= 4


@pytest.mark.parametrize("name", sorted(REFUSED_FIXTURES))
def test_refused_fixture_is_one_line_naming_it(name):
    with pytest.raises(CoderFileError) as err:
        import_sparsify(FIXTURES / name)
    text = str(err.value)
    assert REFUSED_FIXTURES[name] in text and "mechfaith reads activation 'topk'" in text and "\n" not in text


@pytest.mark.parametrize(("name", "change", "tensors", "message"), [
    ("sae", lambda c: c.update(signed=True), None, "signed = true is not supported"),
    ("sae", lambda c: c.update(activation="softmax"), None, "unknown sparsify activation 'softmax'"),
    ("sae", lambda c: c.update(k=65), None, "k = 65 exceeds num_latents = 64"),
    ("sae", lambda c: c.update(k=0), None, "k = 0 is not a positive whole number"),
    ("sae", lambda c: c.update(k=2.5), None, "'k' must be an integer, got 2.5"),
    ("sae", lambda c: c.update(transcode="yes"), None, "'transcode' must be true or false"),
    ("sae", lambda c: c.pop("d_in"), None, "'d_in' is missing"),
    ("sae", lambda c: c.update(num_latents=0, expansion_factor=0), None, "gives no latents"),
    ("sae", lambda c: c.update(d_in=12), None, "tensor encoder.weight has shape (64, 16); cfg.json (d_in 12"),
    ("sae", lambda c: c.update(num_latents=32), None, "tensor encoder.weight has shape (64, 16)"),
    ("sae", lambda c: c.update(skip_connection=True), None, "tensor(s) W_skip missing (skip_connection = true)"),
    ("sae_skip", lambda c: c.update(skip_connection=False), None, "unexpected tensor(s) W_skip"),
    ("sae", None, lambda t: t.pop("b_dec"), "tensor(s) b_dec missing"),
    ("sae", None, lambda t: t.update(W_dec=t["W_dec"][:, :12].contiguous()), "tensor W_dec has shape (64, 12)"),
    ("sae", None, lambda t: t.update(b_dec=torch.full((16,), float("nan"))), "non-finite"),
])
def test_other_settings_are_refused_in_one_line(tmp_path, name, change, tensors, message):
    with pytest.raises(CoderFileError) as err:
        import_sparsify(_edited(tmp_path, name, change, tensors))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_unknown_fields_are_ignored_as_sparsify_does(tmp_path, caplog):
    folder = _edited(tmp_path, "sae", lambda c: c.update(new_option=3, dtype="float32"))
    with caplog.at_level(logging.WARNING):
        coder = import_sparsify(folder).coder
    assert "new_option" in caplog.text and "dtype" not in caplog.text
    e = load_file(str(FIXTURES / "sae" / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(coder(e["x"]), e["sae_out"], atol=1e-5, rtol=0)


def test_a_run_reads_as_a_set_of_layers():
    assert is_coder_set(RUN) and not is_coder_set(RUN / "layers.0.mlp")
    manifest = read_set(RUN)
    assert manifest == read_sparsify_run(RUN)
    assert manifest.layers == [0, 1] and manifest.model == "HuggingFaceTB/SmolLM2-135M"
    assert manifest.coders == {"0": "layers.0.mlp", "1": "layers.1.mlp"}
    assert (manifest.input_site, manifest.output_site) == ("mlp_in", "mlp_out")
    assert set_coder_folders(RUN) == {0: RUN / "layers.0.mlp", 1: RUN / "layers.1.mlp"}
    summary = summarize_set(RUN)
    assert [(r.layer, r.kind, r.skip, r.steps, r.train_fve) for r in summary.per_layer] == \
        [(0, "transcoder", True, None, None), (1, "transcoder", True, None, None)]


@pytest.mark.parametrize(("hookpoints", "message"), [
    (("layers.0.mlp", "embed_tokens"), "'embed_tokens' names no layer"),
    (("layers.0", "layers.0.mlp"), "'layers.0' and 'layers.0.mlp' are both at layer 0"),
])
def test_a_run_that_is_not_a_set_of_layers_is_refused(tmp_path, hookpoints, message):
    for h in hookpoints:
        shutil.copytree(RUN / "layers.0.mlp", tmp_path / "run" / h)
    with pytest.raises(InputError) as err:
        read_set(tmp_path / "run")
    assert message in str(err.value) and "give one hookpoint folder" in str(err.value)


@pytest.mark.parametrize(("name", "transcoder", "expected"), [
    ("layers.3", False, (3, "resid_post", "resid_post")),
    ("layers.3", True, (3, "resid_pre", "resid_post")),
    ("layers.3.mlp", False, (3, "mlp_out", "mlp_out")),
    ("layers.12.mlp", True, (12, "mlp_in", "mlp_out")),
    ("h.5.mlp", True, (5, "mlp_in", "mlp_out")),
    ("gpt_neox.layers.2.mlp", True, (2, "mlp_in", "mlp_out")),
    ("layers.4.post_attention_layernorm", False, (4, "mlp_in", "mlp_in")),
    ("h.4.ln_2", False, (4, "mlp_in", "mlp_in")),
    ("layers.4.self_attn", False, (4, None, None)),
    ("embed_tokens", False, (None, None, None)),
    ("sae", True, (None, None, None)),
])
def test_hookpoints_give_layer_and_sites(name, transcoder, expected):
    assert parse_hookpoint(name, transcoder) == expected
    layer, i, o = expected
    if i is not None and "gpt_neox" not in name:
        model = "gpt2" if name.startswith("h.") else "smollm2-135m"
        assert hookpoint_for(layer, i, o, "transcoder" if transcoder else "sae", model) == name


def test_sites_sparsify_cannot_hook_are_refused():
    with pytest.raises(ConfigError, match="no hookpoint for a transcoder on mlp_in_normalized -> mlp_out"):
        hookpoint_for(3, "mlp_in_normalized", "mlp_out", "transcoder")
    with pytest.raises(ConfigError, match="does not say which layer"):
        hookpoint_for(None, "mlp_in", "mlp_out", "transcoder")


def _coder(**kw):
    cfg = {"d_in": 16, "n_latents": 64, "kind": "transcoder", "activation": "topk", "k": 4, **kw}
    coder = SparseCoder(CoderConfig(**cfg), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in coder.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return coder.eval()


@pytest.mark.parametrize(("fixture", "kw"), [
    ("sae", {"kind": "sae"}),
    ("sae_skip", {"kind": "sae", "skip": True, "decoder_norm": "unit"}),
    ("transcoder", {}),
    ("skip_transcoder", {"skip": True}),
])
def test_export_writes_the_fields_and_tensors_sparsify_writes(tmp_path, fixture, kw):
    coder = _coder(**kw)
    folder = export_sparsify(coder, tmp_path / "out", layer=3, input_site="mlp_in", output_site="mlp_out",
                             model_name="gpt2")
    ours, theirs = json.loads((folder / "cfg.json").read_text()), _cfg(fixture)
    assert sorted(ours) == sorted(theirs)
    assert {k: ours[k] for k in ("transcode", "skip_connection", "multi_topk", "activation")} == \
        {k: theirs[k] for k in ("transcode", "skip_connection", "multi_topk", "activation")}
    assert ours["normalize_decoder"] == (coder.cfg.decoder_norm == "unit" or coder.cfg.kind == "transcoder")
    t_ours = load_file(str(folder / "sae.safetensors"))
    t_theirs = load_file(str(FIXTURES / fixture / "sae.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in t_ours.items()} == {k: (v.shape, v.dtype) for k, v in t_theirs.items()}
    back = import_sparsify(folder)  # lossless through our header entry
    assert back.coder.cfg == coder.cfg and (back.layer, back.input_site, back.output_site, back.model_name) == \
        (3, "mlp_in", "mlp_out", "gpt2")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back.coder(x), coder(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kw", "message"), [
    ({"activation": "relu"}, "sparsify has TopK coders only: a relu transcoder"),
    ({"activation": "jumprelu", "kind": "sae"}, "a jumprelu sae"),
    ({"activation": "batchtopk"}, "a batchtopk transcoder"),
    ({"d_out": 12}, "this transcoder maps 16 to 12 dimensions"),
])
def test_export_refuses_what_sparsify_cannot_hold(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        export_sparsify(_coder(**kw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_set_exports_as_a_run_sparsify_names_by_hookpoint(tmp_path):
    refs = {l: CoderRef(_coder(skip=True), "gpt2", l, "mlp_in", "mlp_out", None, tmp_path) for l in (0, 1)}
    written = export_set_sparsify(refs, tmp_path / "run", "gpt2")
    assert {l: p.name for l, p in written.items()} == {0: "h.0.mlp", 1: "h.1.mlp"}
    manifest = read_set(tmp_path / "run")
    assert manifest.layers == [0, 1] and manifest.model == "gpt2"
    export_set_sparsify(refs, tmp_path / "run", "gpt2")  # a run written before is replaced whole
    refs[1] = CoderRef(_coder(skip=True), "gpt2", 1, "mlp_in_normalized", "mlp_out", None, tmp_path)
    with pytest.raises(ConfigError, match="layer 1: sparsify has no hookpoint"):
        export_set_sparsify(refs, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_the_readme_table_has_every_sparsify_kind():
    text = (FIXTURES.parent.parent.parent / "README.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| sparsify ") and "(sparsify -> mechfaith)" not in line]
    assert len(rows) >= 6
    for name in READ + ["run", "groupmax"]:
        assert any(f"`{name}`" in row for row in rows), name
    assert all("tested" in row or "refused: " in row for row in rows)
