"""Reading a coder set for the commands that take one (lm.coder_set): a real set's manifest passes
every check, each kind of damage is refused with a one-line error naming set.json, one layer is
chosen or the layers are listed, every layer exports to SAELens and back all or nothing, and the
summary is the coders' and the manifest's."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.coders.files import load_coder  # noqa: E402
from mechfaith.errors import ConfigError, InputError, MechfaithError  # noqa: E402
from mechfaith.lm import coder_set  # noqa: E402
from mechfaith.lm.coder_files import open_coder  # noqa: E402
from mechfaith.lm.coder_set import (  # noqa: E402
    export_set_saelens,
    is_coder_set,
    read_set,
    set_coder_folders,
    set_layer_coder,
    summarize_set,
)
from mechfaith.lm.layer_set import SetResult, layers_text  # noqa: E402
from tests.lm.coder_sets import CORRUPTIONS, files_under  # noqa: E402

torch.set_num_threads(1)


def test_a_trained_set_passes_every_check(tiny_set, tmp_path):
    assert is_coder_set(tiny_set) and not is_coder_set(tiny_set / "layers" / "L0" / "coder")
    manifest = read_set(tiny_set)
    assert manifest.layers == [0, 1] and manifest.model == "random-gpt2"
    assert SetResult.from_json(manifest.to_json()) == manifest
    assert set_coder_folders(tiny_set) == {l: tiny_set / "layers" / f"L{l}" / "coder" for l in (0, 1)}
    with pytest.raises(InputError, match="no set.json"):
        read_set(tmp_path)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_damaged_manifest_is_refused_in_one_line(name, set_copy):
    damage, message = CORRUPTIONS[name]
    damage(set_copy)
    with pytest.raises(MechfaithError) as err:
        read_set(set_copy)
    text = str(err.value)
    assert message in text and text.startswith(str(set_copy / "set.json")), text
    assert "\n" not in text


def test_layers_text():
    assert layers_text([0, 1, 2, 5]) == "0-2,5" and layers_text([3]) == "3" and layers_text([4, 1, 2]) == "1-2,4"


def test_one_layer_of_a_set(tiny_set):
    assert set_layer_coder(tiny_set, 1) == tiny_set / "layers" / "L1" / "coder"
    with pytest.raises(ConfigError, match="coder set of layers 0-1: choose one with --layer"):
        set_layer_coder(tiny_set, None)
    with pytest.raises(ConfigError, match="no layer 5 .its layers: 0-1"):
        set_layer_coder(tiny_set, 5)


def test_export_writes_every_layer_that_reads_back(exportable_set, tmp_path):
    tiny_set = exportable_set
    out = tmp_path / "sl"
    assert export_set_saelens(tiny_set, out) == {0: out / "L0", 1: out / "L1"}
    assert sorted(p.name for p in out.iterdir()) == ["L0", "L1"]  # no temporary folder left
    for layer in (0, 1):
        back = open_coder(out / f"L{layer}")
        assert back.layer == layer and back.model == "random-gpt2" and back.input_site == "mlp_in"
        ours = load_coder(tiny_set / "layers" / f"L{layer}" / "coder").state_dict()
        assert set(back.coder.state_dict()) == set(ours)
        for name, t in ours.items():
            assert torch.equal(back.coder.state_dict()[name], t), (layer, name)
    # an existing non-empty folder is refused and kept; an empty one is used
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_set_saelens(tiny_set, out)
    (tmp_path / "empty").mkdir()
    export_set_saelens(tiny_set, tmp_path / "empty")
    assert (tmp_path / "empty" / "L1" / "cfg.json").is_file()


def test_a_set_saelens_cannot_hold_is_refused_before_writing(tiny_set, tmp_path):
    before = files_under(tmp_path)
    with pytest.raises(ConfigError, match="layer 0: SAELens has no TopK transcoder"):
        export_set_saelens(tiny_set, tmp_path / "sl")  # TopK skip transcoders
    assert files_under(tmp_path) == before


def test_export_is_all_or_nothing(exportable_copy, tmp_path, monkeypatch):
    set_copy = exportable_copy
    before = files_under(tmp_path)
    real = coder_set.export_saelens

    def fail_at_layer_1(coder, folder, **kw):
        if kw["layer"] == 1:
            raise ConfigError("SAELens cannot hold this one")
        return real(coder, folder, **kw)

    monkeypatch.setattr(coder_set, "export_saelens", fail_at_layer_1)
    with pytest.raises(ConfigError, match="cannot hold"):
        export_set_saelens(set_copy, tmp_path / "sl")
    assert files_under(tmp_path) == before  # layer 0 was written into a temporary folder, now gone
    monkeypatch.setattr(coder_set, "export_saelens", real)
    weights = set_copy / "layers" / "L1" / "coder" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # a damaged coder: found before anything is written
    before = files_under(tmp_path)
    with pytest.raises(MechfaithError, match="checksum mismatch"):
        export_set_saelens(set_copy, tmp_path / "sl")
    assert files_under(tmp_path) == before


def test_summary_is_the_coders_and_the_manifests(tiny_set):
    s = summarize_set(tiny_set)
    runs = json.loads((tiny_set / "set.json").read_text())["runs"]
    assert s.layers == [0, 1] and [r.layer for r in s.per_layer] == [0, 1]
    for r, run in zip(s.per_layer, runs):
        coder = load_coder(tiny_set / r.coder)
        assert (r.kind, r.activation, r.k, r.n_latents, r.skip) == ("transcoder", "topk", 4, 64, True)
        assert r.n_parameters == sum(p.numel() for p in coder.parameters()) and r.steps == 8
        assert r.train_fve == run["final_train_metrics"]["fve"] and r.train_l0 == run["final_train_metrics"]["l0"]
