"""A coder at every layer (lm.layer_set) on tiny random GPT-2 and Llama models: the set equals each
layer trained alone, a stopped set resumes bit for bit, the manifest round-trips, --layers parses."""

import dataclasses
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.coders.files import load_coder  # noqa: E402
from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm import layer_set  # noqa: E402
from mechfaith.lm.collect import collect  # noqa: E402
from mechfaith.lm.config import LMCoderConfig, LMConfig, lm_train_config  # noqa: E402
from mechfaith.lm.corpus import CorpusConfig  # noqa: E402
from mechfaith.lm.layer_set import SetResult, parse_layers, train_set  # noqa: E402
from mechfaith.lm.model_stream import ModelActivationStream  # noqa: E402
from mechfaith.lm.train import train_coder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    rng = random.Random(1)
    words = "the king queen lord love death night day sword crown heart blood".split()
    for i in range(3):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(1200)))
    return CorpusConfig(source=",".join(str(p) for p in sorted(d.glob("*.txt"))), context_length=24,
                        val_fraction=0.34)


def _cfg(family: str) -> LMConfig:
    return LMConfig(model=f"random-{family}", train_tokens=1200, eval_contexts=4, batch_contexts=8)


def _params(folder):
    return dict(load_coder(folder).named_parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_set_from_a_cache_equals_each_layer_trained_alone(family, corpus_cfg, tmp_path):
    cfg = _cfg(family)
    tcfg = lm_train_config(n_steps=12, batch_size=64, log_every=6, checkpoint_every=0, jacobian_coef=0.01)
    coder_cfg = LMCoderConfig(k=4, expansion=2)
    collected = collect(cfg, corpus_cfg, tmp_path / "acts", layers=[0, 1], progress=False)
    assert collected.layers == [0, 1]  # both layers in one pass
    res = train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "set", [0, 1], activations=tmp_path / "acts",
                    progress=False)
    assert res.layers == [0, 1] and res.runs[0].steps == 12 and res.runs[1].layer == 1
    saved = json.loads((tmp_path / "set" / "set.json").read_text())
    assert saved["format"] == "mechfaith.coder_set" and SetResult.from_json(saved).to_json() == saved
    for layer in (0, 1):
        alone = tmp_path / f"alone{layer}"
        train_coder(LMConfig(**{**cfg.__dict__, "layer": layer}), corpus_cfg, coder_cfg, tcfg, alone,
                    activations=tmp_path / "acts", progress=False)
        ours, theirs = _params(tmp_path / "set" / saved["coders"][str(layer)]), _params(alone / "coder")
        for name, p in theirs.items():
            assert torch.equal(ours[name], p), (layer, name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_set_streamed_from_the_model_equals_each_layer_streamed_alone(family, corpus_cfg, tmp_path):
    cfg = dataclasses.replace(_cfg(family), stream_block_tokens=200)  # several blocks, > 1 epoch
    tcfg = lm_train_config(n_steps=30, batch_size=64, log_every=10, checkpoint_every=0, jacobian_coef=0.01)
    coder_cfg = LMCoderConfig(k=4, expansion=2)
    res = train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "set", [0, 1], progress=False)
    assert not (tmp_path / "set" / "activations").exists()  # nothing cached on disk
    assert res.activations == layer_set.STREAMED and res.runs[0].epochs > 1
    for layer in (0, 1):
        train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / f"alone{layer}", [layer], progress=False)
        ours = _params(tmp_path / "set" / res.coders[str(layer)])
        theirs = _params(tmp_path / f"alone{layer}" / "layers" / f"L{layer}" / "coder")
        for name, p in theirs.items():
            torch.testing.assert_close(ours[name], p, atol=1e-5, rtol=0, msg=f"{layer} {name}")


@pytest.mark.parametrize("source", ["model", "cache"])
def test_a_stopped_set_resumes_bit_for_bit(source, corpus_cfg, tmp_path, monkeypatch):
    cfg = dataclasses.replace(_cfg("gpt2"), stream_block_tokens=150)
    tcfg = lm_train_config(n_steps=10, batch_size=64, log_every=5, checkpoint_every=4)
    coder_cfg = LMCoderConfig(k=4, expansion=2)
    acts = None
    if source == "cache":
        acts = tmp_path / "acts"
        collect(cfg, corpus_cfg, acts, layers=[0, 1], progress=False)
    train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "whole", [0, 1], activations=acts, progress=False)

    calls = {"n": 0}
    cls = layer_set.LayersStream if source == "cache" else ModelActivationStream
    real = cls.next_batch

    def stop_after_five(self):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(cls, "next_batch", stop_after_five)
    with pytest.raises(KeyboardInterrupt):
        train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "stopped", [0, 1], activations=acts, progress=False)
    assert not (tmp_path / "stopped" / "set.json").exists()
    monkeypatch.setattr(cls, "next_batch", real)
    res = train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "stopped", [0, 1], activations=acts,
                    resume=True, progress=False)
    assert [r.steps for r in res.runs] == [10, 10]
    for layer in (0, 1):
        a = _params(tmp_path / "whole" / "layers" / f"L{layer}" / "coder")
        b = _params(tmp_path / "stopped" / "layers" / f"L{layer}" / "coder")
        for name, p in a.items():
            assert torch.equal(b[name], p), (layer, name)
    # each layer's log has every logged step once
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "stopped" / "layers" / "L1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 5, 10]


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1-3", 30) == [1, 2, 3]
    assert parse_layers("5, 1,3-4", 30) == [1, 3, 4, 5]
    for bad in ("", "x", "0-40", "-1", "3-a"):
        with pytest.raises(ConfigError):
            parse_layers(bad, 30)


def _identity_sae(d: int):
    """An exact identity SAE (ReLU(x) - ReLU(-x) = x): splicing it changes nothing."""
    from mechfaith.coders import CoderConfig, SparseCoder
    coder = SparseCoder(CoderConfig(d_in=d, n_latents=2 * d, kind="sae", activation="relu", decoder_norm="penalty"))
    eye = torch.eye(d)
    with torch.no_grad():
        coder.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        coder.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        coder.b_enc.zero_()
        coder.b_dec.zero_()
    return coder


def test_set_eval_of_identity_coders_leaves_the_model_unchanged(corpus_cfg, tmp_path):
    from mechfaith.coders.files import save_coder
    from mechfaith.lm.set_eval import evaluate_set

    cfg = _cfg("llama")
    tcfg = lm_train_config(n_steps=4, batch_size=64, log_every=2, checkpoint_every=0)
    res = train_set(cfg, corpus_cfg, LMCoderConfig(kind="sae", k=4, expansion=2), tcfg, tmp_path / "set", [0, 1],
                    sae_site="output", progress=False)
    for layer in res.layers:
        meta = {"model": res.model, "layer": layer, "input_site": "mlp_out", "output_site": "mlp_out",
                "corpus": corpus_cfg.__dict__}
        save_coder(_identity_sae(32), tmp_path / "set" / res.coders[str(layer)], training=meta)
    for keep_bos in (True, False):
        ev = evaluate_set(tmp_path / "set", cfg, keep_bos=keep_bos, progress=False)
        assert ev.ce_all == pytest.approx(ev.ce_clean, abs=1e-7) and abs(ev.kl_all) < 1e-9
        assert all(p.fve == pytest.approx(1.0, abs=1e-6) and abs(p.kl_alone) < 1e-9 for p in ev.per_layer)
        assert ev.kl_zero_ablated > 1e-6  # the baseline (every MLP zero-ablated) does change the model


def test_set_eval_figures_agree_with_single_splices(corpus_cfg, tmp_path):
    from mechfaith.lm.corpus import eval_contexts
    from mechfaith.lm.fidelity import FidelityConfig, evaluate_fidelity
    from mechfaith.lm.model_cache import get_model
    from mechfaith.lm.set_eval import SetEvalResult, evaluate_set

    cfg = _cfg("gpt2")
    tcfg = lm_train_config(n_steps=8, batch_size=64, log_every=4, checkpoint_every=0)
    res = train_set(cfg, corpus_cfg, LMCoderConfig(k=4, expansion=2), tcfg, tmp_path / "set", [0, 1], progress=False)
    ev = evaluate_set(tmp_path / "set", cfg, progress=False)
    saved = json.loads((tmp_path / "set" / "eval.json").read_text())
    assert SetEvalResult.from_json(saved).to_json() == saved and saved["ce_increase"] == ev.ce_all - ev.ce_clean
    assert ev.layers == [0, 1] and ev.ce_all_but_first_last is None  # two layers: no middle
    assert ev.per_layer[-1].ce_prefix == ev.ce_all and ev.per_layer[0].ce_prefix == ev.per_layer[0].ce_alone
    # independent computation: each layer alone and the whole set by the single-splice evaluator
    lm = get_model(cfg)
    contexts, _ = eval_contexts(lm, corpus_cfg, cfg.eval_contexts)
    fcfg = FidelityConfig(batch_contexts=cfg.batch_contexts, keep_bos=True)
    coders = {l: load_coder(tmp_path / "set" / res.coders[str(l)]) for l in (0, 1)}
    for p in ev.per_layer:
        one = evaluate_fidelity(lm.adapter, contexts, {p.layer: coders[p.layer]}, cfg=fcfg)
        assert p.ce_alone == pytest.approx(one.ce_spliced, rel=1e-6)
        assert p.fve == pytest.approx(one.layer_stats[0].fve, rel=1e-6)
    both = evaluate_fidelity(lm.adapter, contexts, coders, cfg=fcfg)
    assert ev.ce_all == pytest.approx(both.ce_spliced, rel=1e-6)
    assert ev.ce_zero_ablated == pytest.approx(both.ce_zero_ablated, rel=1e-6)
