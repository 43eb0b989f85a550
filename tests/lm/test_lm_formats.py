"""Formats: SAELens export/import round-trips; the legacy GPT-2 transcoder importer reproduces a
synthetic transcoder exactly and refuses malicious pickles without running them."""

import dataclasses
import json
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.coders.files import write_tensors
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.lm.gpt2_transcoders import import_gpt2_transcoder
from mechfaith.lm.saelens import export_saelens, import_saelens
from mechfaith.lm.safe_unpickle import UnsafePickleError, safe_torch_load

torch.set_num_threads(1)


def random_coder(seed=0, **kw):
    cfg = dict(d_in=12, n_latents=30, d_out=10, kind="transcoder", activation="relu")
    cfg.update(kw)
    coder = SparseCoder(CoderConfig(**cfg), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in coder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return coder


@pytest.mark.parametrize("kw", [
    {},
    {"kind": "sae", "d_out": 12, "activation": "topk", "k": 4},
    {"activation": "jumprelu", "jumprelu_threshold": 0.05},
    {"skip": True},
    {"skip": True, "activation": "jumprelu", "jumprelu_threshold": 0.05},
    {"kind": "sae", "d_out": 12, "activation": "jumprelu"},
    {"kind": "sae", "d_out": 12, "skip": True},
])
def test_saelens_round_trip(tmp_path, kw):
    coder = random_coder(**kw).eval()
    folder = export_saelens(coder, tmp_path / "sae", layer=3, input_site="mlp_in", output_site="mlp_out",
                            model_name="tiny")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_sae"] == 30 and cfg["metadata"]["hook_name"] == "blocks.3.ln2.hook_normalized"
    imp = import_saelens(folder)
    assert imp.layer == 3 and imp.input_site == "mlp_in" and imp.output_site == "mlp_out"
    assert imp.coder.cfg == coder.cfg
    x = torch.randn(20, 12)
    torch.testing.assert_close(imp.coder(x), coder(x), atol=1e-6, rtol=1e-6)
    if kw.get("skip"):
        with __import__("safetensors").safe_open(str(folder / "sae_weights.safetensors"), "pt") as fh:
            d_out = 12 if kw.get("kind") == "sae" else 10
            assert fh.get_tensor("W_skip").shape == (d_out, 12)  # SAELens orientation [d_out, d_in]


@pytest.mark.parametrize("kw", [{"activation": "topk", "k": 3}, {"activation": "topk", "k": 3, "skip": True},
                                {"kind": "sae", "d_out": 12, "activation": "topk", "k": 3, "skip": True}])
def test_topk_transcoders_are_refused_before_writing(tmp_path, kw):
    with pytest.raises(ConfigError, match="SAELens has no TopK"):
        export_saelens(random_coder(**kw), tmp_path / "tc")
    assert not (tmp_path / "tc").exists()


def test_lm_export_of_a_topk_transcoder_is_exit_2_and_nothing_written(tmp_path, capsys):
    from mechfaith.cli.main import main
    from mechfaith.coders.files import save_coder

    save_coder(random_coder(activation="topk", k=3, skip=True), tmp_path / "coder")
    assert main(["lm", "export", str(tmp_path / "coder"), "--out", str(tmp_path / "sl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SAELens has no TopK transcoder" in err[0], err
    assert not (tmp_path / "sl").exists()


def test_batchtopk_exports_as_jumprelu_with_its_threshold(tmp_path):
    coder = random_coder(activation="batchtopk", k=4)
    coder.train()
    coder.forward_full(torch.randn(64, 12))  # sets the inference threshold
    coder.eval()
    imp = import_saelens(export_saelens(coder, tmp_path / "b"))
    x = torch.randn(16, 12)
    torch.testing.assert_close(imp.coder(x), coder(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="threshold"):
        export_saelens(random_coder(activation="batchtopk", k=4), tmp_path / "c")


def test_import_foreign_saelens_standard_sae_with_b_dec_on_input(tmp_path):
    g = torch.Generator().manual_seed(7)
    W_enc, b_enc = torch.randn(8, 20, generator=g), torch.randn(20, generator=g)
    W_dec, b_dec = torch.randn(20, 8, generator=g), torch.randn(8, generator=g)
    folder = tmp_path / "foreign"
    folder.mkdir()
    write_tensors(folder / "sae_weights.safetensors", {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": 8, "d_sae": 20, "hook_name": "blocks.4.hook_resid_pre", "activation_fn_str": "relu",
        "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    imp = import_saelens(folder)
    x = torch.randn(10, 8, generator=g)
    want = torch.relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec
    torch.testing.assert_close(imp.coder(x), want, atol=1e-5, rtol=1e-5)
    assert imp.layer == 4 and imp.input_site == "resid_pre" and imp.coder.cfg.kind == "sae"
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CoderFileError, match="normalize_activations"):
        import_saelens(folder)


# ---------------------------------------------------------------------- legacy GPT-2 transcoders
LEGACY_NAME = "final_sparse_autoencoder_gpt2-small_blocks.5.ln2.hook_normalized_40.pt"


def write_legacy(path, d=16, n=40, seed=0):
    """A file in the released format, written by torch.save with a config object of a foreign class."""
    mod = types.ModuleType("sae_training.config")
    pkg = types.ModuleType("sae_training")

    @dataclasses.dataclass
    class LanguageModelSAERunnerConfig:
        d_in: int = d
        d_sae: int = n
        hook_point: str = "blocks.5.ln2.hook_normalized"
        out_hook_point: str = "blocks.5.hook_mlp_out"
        is_transcoder: bool = True
        dtype: torch.dtype = torch.float32
        device: object = None
        use_ghost_grads: tuple = (False,)
        lr: float = 4e-4

    LanguageModelSAERunnerConfig.__module__ = "sae_training.config"
    LanguageModelSAERunnerConfig.__qualname__ = "LanguageModelSAERunnerConfig"
    mod.LanguageModelSAERunnerConfig = LanguageModelSAERunnerConfig
    sys.modules["sae_training"], sys.modules["sae_training.config"] = pkg, mod
    try:
        g = torch.Generator().manual_seed(seed)
        sd = OrderedDict(W_enc=torch.randn(d, n, generator=g), b_enc=torch.randn(n, generator=g),
                         W_dec=torch.randn(n, d, generator=g), b_dec=torch.randn(d, generator=g),
                         b_dec_out=torch.randn(d, generator=g))
        torch.save({"cfg": LanguageModelSAERunnerConfig(device=torch.device("cpu")), "state_dict": sd}, path)
    finally:
        del sys.modules["sae_training"], sys.modules["sae_training.config"]
    return sd


def test_legacy_importer_reproduces_synthetic_transcoder(tmp_path):
    path = tmp_path / LEGACY_NAME
    sd = write_legacy(path)
    imp = import_gpt2_transcoder(path)
    assert imp.layer == 5 and imp.input_site == "mlp_in_normalized" and imp.output_site == "mlp_out_centered"
    assert imp.source["__class__"] == "sae_training.config.LanguageModelSAERunnerConfig"
    assert imp.source["d_sae"] == 40 and imp.source["dtype"] == "float32" and imp.source["device"] == "cpu"
    x = torch.randn(50, 16)
    want = torch.relu((x.double() - sd["b_dec"].double()) @ sd["W_enc"].double() + sd["b_enc"].double()) \
        @ sd["W_dec"].double() + sd["b_dec_out"].double()
    torch.testing.assert_close(imp.coder(x).double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(imp.coder.W_enc, sd["W_enc"])  # weights taken over bit for bit
    torch.testing.assert_close(imp.coder.W_dec, sd["W_dec"])


def _torch_zip_with_pickle(path, payload: bytes):
    """A torch.save-style zip whose data.pkl is ``payload``."""
    torch.save({"a": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("/data.pkl"))
    entries[pkl] = payload
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / LEGACY_NAME
    _torch_zip_with_pickle(path, pickle.dumps({"cfg": _Evil(f"touch {marker}"), "state_dict": {}}, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        import_gpt2_transcoder(path)
    assert not marker.exists()
    # a call of a foreign class (REDUCE on an unknown global) is refused too
    payload = b"\x80\x02cevil.module\nThing\nq\x00X\x03\x00\x00\x00arg\x85R."
    _torch_zip_with_pickle(path, payload)
    with pytest.raises(UnsafePickleError, match="Thing"):
        safe_torch_load(path)
    # builtins such as eval are refused by name
    _torch_zip_with_pickle(path, b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1;\x85R.")
    with pytest.raises(UnsafePickleError, match="eval"):
        safe_torch_load(path)
    # a plain (non-zip) pickle is not even opened
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(_Evil(f"touch {marker}")))
    with pytest.raises(CoderFileError, match="zip"):
        import_gpt2_transcoder(plain)
    assert not marker.exists()


def test_gpt2_convention_centred_output_replaces_mlp_out():
    """On a Hugging Face GPT-2, splicing the MLP as a map mlp_in_normalized -> mlp_out_centered leaves
    the logits unchanged: the convention of the released transcoders is exact."""
    pytest.importorskip("transformers")
    from mechfaith.lm.models import random_model
    from mechfaith.lm.splice import splice

    lm = random_model("gpt2", seed=9)
    a = lm.adapter
    ids = torch.randint(2, 100, (2, 7))
    with torch.no_grad():
        clean = a.logits(ids)
        ref = {l: a.mlp_function(l, "mlp_in_normalized", "mlp_out_centered") for l in range(2)}
        with splice(a, ref, input_site="mlp_in_normalized", output_site="mlp_out_centered"):
            torch.testing.assert_close(a.logits(ids), clean, atol=1e-5, rtol=1e-5)
