"""Cross-layer transcoders in a model (lm.clt_splice, lm.clt_eval, lm.clt_train, lm train --clt):
a reach-0 CLT splices exactly like the per-layer set it holds; a full CLT's spliced MLP outputs
equal its batched forward pass on the inputs of the spliced run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.coders import CoderConfig, SparseCoder  # noqa: E402
from mechfaith.coders.clt import CrossLayerTranscoder  # noqa: E402
from mechfaith.coders.clt_config import CLTConfig  # noqa: E402
from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm.adapters import hooks_removed_after  # noqa: E402
from mechfaith.lm.clt_eval import evaluate_clt_on  # noqa: E402
from mechfaith.lm.clt_splice import splice_clt  # noqa: E402
from mechfaith.lm.fidelity import FidelityConfig, SpliceEntry, evaluate_many  # noqa: E402
from mechfaith.lm.models import random_model  # noqa: E402
from mechfaith.lm.splice import splice  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    return random_model(request.param, n_layers=3, seed=3)


def _ids(n: int = 3, seq: int = 9) -> torch.Tensor:
    ids = torch.randint(2, 100, (n, seq), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


def _coders(d: int, activation: str = "topk") -> list[SparseCoder]:
    out = []
    for s in range(2):
        cfg = CoderConfig(d_in=d, n_latents=24, activation=activation, k=5, skip=True, jumprelu_threshold=0.05)
        c = SparseCoder(cfg, generator=torch.Generator().manual_seed(s))
        with torch.no_grad():
            c.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(10 + s))  # type: ignore[union-attr]
            c.b_dec.add_(0.1)
        out.append(c)
    return out


def test_reach_zero_clt_splices_exactly_like_its_per_layer_set(lm):
    a = lm.adapter
    coders = _coders(a.d_model)
    clt = CrossLayerTranscoder.from_coders(coders, first_layer=1)
    ids = _ids()
    with torch.no_grad():
        with splice(a, {1: coders[0], 2: coders[1]}, keep_bos=True):
            want = a.logits(ids)
        with splice_clt(a, clt, keep_bos=True):
            got = a.logits(ids)
        clean = a.logits(ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, clean, atol=1e-3)  # the splice does something
    # the same evaluation code for both: CE spliced equal to evaluate_many's of the set
    fc = FidelityConfig(batch_contexts=2, keep_bos=True, keep_massive=0.0)
    many = evaluate_many(a, ids, {"set": [SpliceEntry(coders[0], 1, "mlp_in", "mlp_out"),
                                          SpliceEntry(coders[1], 2, "mlp_in", "mlp_out")]}, fc, ablations=[[1, 2]])
    e = evaluate_clt_on(a, clt, ids, batch_contexts=2, keep_bos=True, keep_massive=0.0)
    assert e.ce_spliced == pytest.approx(many.coders["set"].ce_spliced, rel=1e-5)
    assert e.ce_clean == pytest.approx(many.baseline.ce_clean, rel=1e-6)
    assert e.ce_zero_ablated == pytest.approx(many.baseline.ce_zero_ablated["1,2"], rel=1e-6)
    for p, st in zip(e.per_layer, many.coders["set"].layer_stats):
        assert p.fve == pytest.approx(st.fve, rel=1e-4, abs=1e-5)
        assert p.l0 == pytest.approx(st.l0, rel=1e-5)


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
def test_full_clt_splice_writes_every_later_layer(lm, activation):
    a = lm.adapter
    cfg = CLTConfig(n_layers=3, d_in=a.d_model, n_latents=20, first_layer=0, activation=activation, k=4, skip=True,
                    jumprelu_threshold=0.05, init_scale=0.5)
    clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(1))
    ids = _ids()
    got: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad(), splice_clt(a, clt, replace=[0, 2]), hooks_removed_after() as hs:
        for l in range(3):
            hs.extend(a.hook_site(l, "mlp_in", lambda t, l=l: got.__setitem__((l, "in"), t)))
            hs.extend(a.hook_site(l, "mlp_out", lambda t, l=l: got.__setitem__((l, "out"), t)))
        a.logits(ids)
    x = torch.stack([got[(l, "in")].reshape(-1, a.d_model) for l in range(3)])
    with torch.no_grad():
        want = clt.forward_full(x).y_hat
        real1 = a.mlp_forward(1, got[(1, "in")]).reshape(-1, a.d_model)
    # replaced layers: the CLT's reconstruction, sums over every earlier layer's writes included
    torch.testing.assert_close(got[(0, "out")].reshape(-1, a.d_model), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[(2, "out")].reshape(-1, a.d_model), want[2], atol=1e-5, rtol=1e-5)
    # layer 1 kept the model's own MLP (its latents were still computed and reach layer 2)
    torch.testing.assert_close(got[(1, "out")].reshape(-1, a.d_model), real1, atol=1e-5, rtol=1e-5)
    upper = CrossLayerTranscoder(CLTConfig(n_layers=2, d_in=a.d_model, n_latents=4, first_layer=1))
    with pytest.raises(ConfigError, match="cannot replace"):
        with splice_clt(a, upper, replace=[0]):
            pass


def test_lm_train_clt_cli_trains_evaluates_and_resumes(tmp_path):
    out = tmp_path / "clt-run"
    base = [sys.executable, "-m", "mechfaith", "lm", "train", "--clt", "--layers", "0-1", "--model", "gpt2-random",
            "--train-tokens", "3000", "--n-latents", "32", "--k", "4", "--batch-size", "64", "--quiet",
            "--eval-contexts", "2", "--batch-contexts", "2", "--checkpoint-every", "3"]
    r = subprocess.run(base + ["--out", str(out), "--n-steps", "6", "--eval"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "trained a CLT" in r.stdout and "CE clean" in r.stdout
    train = json.loads((out / "train.json").read_text())
    assert train["command"] == "train-clt" and train["layers"] == [0, 1] and train["steps"] == 6
    assert train["clt_config"]["n_latents"] == 32 and train["clt_config"]["reach"] is None
    ev = json.loads((out / "eval.json").read_text())
    assert ev["command"] == "eval-clt" and len(ev["per_layer"]) == 2
    # resume to 9 steps; a non-contiguous block and --reach without --clt are one-line errors
    r = subprocess.run(base + ["--out", str(out), "--n-steps", "9", "--resume"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "train.json").read_text())["steps"] == 9
    for extra, msg in ((["--layers", "0,2"], "contiguous"), (["--reach", "1", "--layers", "0-1"], None)):
        argv = [a for a in base if a != "--clt"] if msg is None else base
        argv = argv[:argv.index("--layers")] + argv[argv.index("--layers") + 2:] + extra
        r = subprocess.run(argv + ["--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mechfaith: error:"), r.stderr
        assert (msg or "--reach") in lines[0]
