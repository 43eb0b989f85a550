"""LM pipeline: collect -> train -> eval on tiny random GPT-2 / Llama / BERT, the multi-coder
evaluation of the sweep against the single-coder one, SAE splicing, skip initialisation."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.coders import CoderConfig, SparseCoder  # noqa: E402
from mechfaith.coders.files import load_coder  # noqa: E402
from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm.activation_cache import ActivationCache, CachedActivationStream  # noqa: E402
from mechfaith.lm.collect import CollectResult, collect  # noqa: E402
from mechfaith.lm.config import LMCoderConfig, LMConfig, lm_train_config  # noqa: E402
from mechfaith.lm.corpus import (  # noqa: E402
    ByteTokenizer,
    CorpusConfig,  # noqa: E402
    get_corpus,
)
from mechfaith.lm.evaluate import evaluate  # noqa: E402
from mechfaith.lm.fidelity import FidelityConfig, SpliceEntry, evaluate_fidelity, evaluate_many  # noqa: E402
from mechfaith.lm.model_cache import get_model  # noqa: E402
from mechfaith.lm.splice import splice  # noqa: E402
from mechfaith.lm.sweep import SweepResult, run_sweep  # noqa: E402
from mechfaith.lm.train import ColumnStream, train_coder  # noqa: E402
from mechfaith.reports.sweep_plot import plot_sweep  # noqa: E402

torch.set_num_threads(1)

WORDS = "the king queen lord love death night day sword crown heart blood".split()


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    for i in range(4):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    return CorpusConfig(source=",".join(str(p) for p in sorted(d.glob("*.txt"))), context_length=24,
                        val_fraction=0.25)


def lm_cfg(family, **kw):
    base = dict(model=f"random-{family}", layer=1, train_tokens=2000, eval_contexts=6, batch_contexts=8)
    base.update(kw)
    return LMConfig(**base)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_collect_train_eval_end_to_end(family, corpus_cfg, tmp_path):
    cfg = lm_cfg(family)
    tcfg = lm_train_config(n_steps=40, batch_size=128, log_every=20, checkpoint_every=0)
    s = train_coder(cfg, corpus_cfg, LMCoderConfig(k=4, expansion=4), tcfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("train.json", "metrics.jsonl", "coder/config.json", "activations/index.json",
                 "activations/collect.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "train.json").read_text())
    assert saved["layer"] == 1 and saved["steps"] == 40 and saved["tokens"] == 40 * 128
    assert saved["unique_tokens"] >= 2000
    coder = load_coder(run / "coder")
    assert coder.cfg.activation == "topk" and coder.cfg.k == 4 and coder.cfg.skip and coder.n_latents == 128
    # the skip starts at the least-squares fit, so training from it ends far above zero FVE
    assert s.skip_lstsq_fve > 0.5 and s.final_train_metrics["fve"] > 0.5
    e = evaluate(run, progress=False)
    assert (run / "eval.json").is_file() and json.loads((run / "eval.json").read_text())["layer"] == 1
    assert e.eval_source.startswith("validation documents")
    assert e.path == str(run / "eval.json")
    assert e.to_json() == json.loads((run / "eval.json").read_text())
    assert e.l0 <= 4 + 1e-9 and e.l0_bos is not None and e.fve > 0.5
    if family == "bert":  # no causal LM head: fidelity on the final hidden states
        assert e.ce_clean is None
        assert e.hidden_rel_error_spliced < e.hidden_rel_error_zero_ablated
    else:
        assert e.ce_clean is not None and e.kl_spliced >= 0
        assert abs(e.ce_spliced - e.ce_clean) < abs(e.ce_zero_ablated - e.ce_clean) + 1e-3


def test_collect_reuse_and_bad_layer(corpus_cfg, tmp_path):
    cfg = lm_cfg("llama", layer=0, train_tokens=500)
    s = collect(cfg, corpus_cfg, tmp_path / "acts", layers=[0, 1], progress=False)
    assert s.layers == [0, 1] and s.n_tokens >= 500
    on_disk = json.loads((tmp_path / "acts" / "collect.json").read_text())
    assert on_disk == s.to_json() and on_disk["command"] == "collect" and CollectResult.from_json(on_disk) == s
    cache = ActivationCache(tmp_path / "acts")
    x0, y0 = cache.load(0)
    x1, _ = cache.load(1)
    assert x0.shape == (s.n_tokens, 32) and not torch.allclose(x0[:10], x1[:10])
    with pytest.raises(ConfigError, match="out of range"):
        collect(lm_cfg("llama", layer=7), corpus_cfg, tmp_path / "bad", progress=False)
    # training from an existing cache uses its layer and sites
    tcfg = lm_train_config(n_steps=5, batch_size=64, log_every=5, checkpoint_every=0)
    s2 = train_coder(lm_cfg("llama", layer=1), corpus_cfg, LMCoderConfig(k=4, expansion=2), tcfg,
                     tmp_path / "run", activations=tmp_path / "acts", progress=False)
    assert s2.layer == 1 and s2.activations == str(tmp_path / "acts")
    assert s2.to_json() == json.loads((tmp_path / "run" / "train.json").read_text())
    with pytest.raises(ConfigError, match="needs a sparsity penalty"):
        train_coder(lm_cfg("llama"), corpus_cfg, LMCoderConfig(activation="relu", expansion=2), tcfg,
                    tmp_path / "run2", activations=tmp_path / "acts", progress=False)


def test_jacobian_matching_uses_the_real_mlp(corpus_cfg, tmp_path):
    """Jacobian matching against the model's gated-SiLU MLP brings the coder's Jacobian closer to
    the MLP's (checked with autograd Jacobians of both, independently of the trainer's estimate)."""
    errs = {}
    for coef in (0.0, 3.0):
        tcfg = lm_train_config(n_steps=60, batch_size=64, lr=1e-4, log_every=20, checkpoint_every=0,
                               jacobian_coef=coef)
        run = tmp_path / f"run{coef}"
        train_coder(lm_cfg("llama", train_tokens=600), corpus_cfg, LMCoderConfig(k=4, expansion=2), tcfg,
                    run, progress=False)
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("jacobian_rel" in r for r in recs) == (coef > 0)
        coder = load_coder(run / "coder")
        x, _ = ActivationCache(run / "activations").load(1, max_rows=20)
        mlp = get_model(lm_cfg("llama")).adapter.mlp_function(1)
        j_mlp = torch.stack([torch.autograd.functional.jacobian(lambda v: mlp(v[None])[0], xi) for xi in x])
        j_coder = torch.stack([torch.autograd.functional.jacobian(lambda v: coder(v[None])[0], xi) for xi in x])
        errs[coef] = float((j_coder - j_mlp).pow(2).sum() / j_mlp.pow(2).sum())
    assert errs[3.0] < 0.5 * errs[0.0]


def test_evaluate_many_matches_single_coder_evaluation(corpus_cfg):
    lm = get_model(lm_cfg("gpt2"))
    contexts = get_corpus(lm, corpus_cfg).val[:6]
    g = torch.Generator().manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=32, n_latents=64, activation="topk", k=5, skip=True), generator=g)
    with torch.no_grad():
        coder.W_skip.copy_(0.5 * torch.eye(32))
    fcfg = FidelityConfig(batch_contexts=4)
    ref = evaluate_fidelity(lm.adapter, contexts, {1: coder}, "mlp_in", "mlp_out", fcfg)
    many = evaluate_many(lm.adapter, contexts, {"tc": SpliceEntry(coder, 1, "mlp_in", "mlp_out")}, fcfg)
    c, b = many.coders["tc"], many.baseline
    assert c.ce_spliced == pytest.approx(ref.ce_spliced, rel=1e-6)
    assert b.ce_clean == pytest.approx(ref.ce_clean, rel=1e-6)
    assert b.ce_zero_ablated["1"] == pytest.approx(ref.ce_zero_ablated, rel=1e-6)
    assert b.ce_mean_ablated["1"] == pytest.approx(ref.ce_mean_ablated, rel=1e-6)
    assert c.kl_spliced == pytest.approx(ref.kl_spliced, rel=1e-5)
    assert c.layer_stats[0].fve == pytest.approx(ref.layer_stats[0].fve, rel=1e-6)
    assert c.layer_stats[0].l0 == pytest.approx(ref.layer_stats[0].l0)
    assert c.loss_recovered_zero == pytest.approx(ref.loss_recovered_zero, rel=1e-5)
    # two coders at once: each as if alone; both together ablate and splice both layers
    other = SparseCoder(CoderConfig(d_in=32, n_latents=64, activation="topk", k=3), generator=g)
    pair = evaluate_many(lm.adapter, contexts, {"tc": SpliceEntry(coder, 1, "mlp_in"),
                                                 "both": [SpliceEntry(coder, 1, "mlp_in"),
                                                          SpliceEntry(other, 0, "mlp_in")]}, fcfg)
    assert pair.coders["tc"].ce_spliced == pytest.approx(ref.ce_spliced, rel=1e-6)
    both = evaluate_fidelity(lm.adapter, contexts, {0: other, 1: coder}, "mlp_in", "mlp_out", fcfg)
    assert pair.coders["both"].ce_spliced == pytest.approx(both.ce_spliced, rel=1e-6)
    assert pair.baseline.ce_zero_ablated["0,1"] == pytest.approx(both.ce_zero_ablated, rel=1e-6)
    assert both.ce_spliced != pytest.approx(ref.ce_spliced, rel=1e-6)


def test_sae_of_mlp_output_splices_in_place_of_the_output():
    lm = get_model(lm_cfg("llama"))
    a = lm.adapter
    ids = torch.randint(2, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0
    with torch.no_grad():
        clean = a.logits(ids)
        with splice(a, {1: lambda y: y.clone()}, input_site="mlp_out"):
            same = a.logits(ids)
        with splice(a, {1: lambda y: 0.0 * y}, input_site="mlp_out"):
            zero = a.logits(ids)
    torch.testing.assert_close(same, clean)
    assert not torch.allclose(zero, clean, atol=1e-4)
    for mod in lm.model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


def test_column_stream_modes_and_resume(corpus_cfg, tmp_path):
    collect(lm_cfg("gpt2", train_tokens=400), corpus_cfg, tmp_path / "acts", progress=False)
    cache = ActivationCache(tmp_path / "acts")
    s = ColumnStream(CachedActivationStream(cache, 1, batch_size=16, seed=3), "y")
    s.next_batch()
    state = s.state_dict()
    a, none = s.next_batch()
    assert none is None and a.shape == (16, 32)
    s2 = ColumnStream(CachedActivationStream(cache, 1, batch_size=16, seed=3), "y")
    s2.load_state_dict(state)
    torch.testing.assert_close(s2.next_batch()[0], a)
    xy = ColumnStream(CachedActivationStream(cache, 1, batch_size=16, seed=3), "xy")
    xy.load_state_dict(state)
    x, y = xy.next_batch()
    torch.testing.assert_close(y, a)
    assert not torch.allclose(x, y)


def test_byte_tokenizer_keeps_bos_free():
    tok = ByteTokenizer(10, bos_token_id=0)
    ids = tok("héllo")["input_ids"]
    assert len(ids) == len("héllo".encode()) and min(ids) >= 2 and max(ids) < 10


def test_sweep_writes_json_and_png(corpus_cfg, tmp_path):
    cfg = lm_cfg("gpt2", train_tokens=1500)
    tcfg = lm_train_config(n_steps=30, batch_size=128, log_every=15, checkpoint_every=0)
    res = run_sweep(cfg, corpus_cfg, LMCoderConfig(expansion=4), tcfg, [2, 8], tmp_path / "sw", progress=False)
    plot_sweep(res, res.figure)
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert saved == res.to_json() and SweepResult.from_json(saved).to_json() == saved
    assert "hidden_rel_error_spliced" not in saved["runs"][0] and "hidden_rel_error_zero_ablated" not in saved["baseline"]
    assert [r_["name"] for r_ in saved["runs"]] == ["transcoder_k2", "transcoder_k8", "sae_k2", "sae_k8"]
    by = {r_["name"]: r_ for r_ in saved["runs"]}
    assert by["sae_k2"]["l0"] <= 2 + 1e-9 and by["sae_k8"]["l0"] <= 8 + 1e-9
    assert by["sae_k2"]["input_site"] == "mlp_out" and by["transcoder_k2"]["input_site"] == "mlp_in"
    # a larger k reconstructs the MLP output better
    assert by["sae_k8"]["fve"] > by["sae_k2"]["fve"]
    assert saved["baseline"]["ce_clean"] > 0 and "1" in saved["baseline"]["ce_mean_ablated"]
    assert all(r_["ce_spliced"] is not None for r_ in saved["runs"])
    # the sweep trains every coder in one engine from one stream: each equals a run of its own
    for name, kind, k in (("transcoder_k8", "transcoder", 8), ("sae_k2", "sae", 2)):
        alone = tmp_path / f"alone_{name}"
        train_coder(cfg, corpus_cfg, LMCoderConfig(expansion=4, kind=kind, k=k), tcfg, alone,
                    activations=tmp_path / "sw" / "activations", sae_site="output", progress=False)
        a, b = load_coder(alone / "coder"), load_coder(tmp_path / "sw" / "runs" / name / "coder")
        for pname, p in a.named_parameters():
            assert torch.equal(p, getattr(b, pname)), (name, pname)
    with pytest.raises(ConfigError):
        run_sweep(cfg, corpus_cfg, LMCoderConfig(), tcfg, [2.5], tmp_path / "bad", progress=False)
