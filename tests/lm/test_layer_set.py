"""A coder at every layer (lm.layer_set) on tiny random GPT-2 and Llama models: the set equals each
layer trained alone, a stopped set resumes bit for bit, the manifest round-trips, --layers parses."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from mechfaith.coders.files import load_coder  # noqa: E402
from mechfaith.errors import ConfigError  # noqa: E402
from mechfaith.lm import layer_set  # noqa: E402
from mechfaith.lm.config import LMCoderConfig, LMConfig, lm_train_config  # noqa: E402
from mechfaith.lm.corpus import CorpusConfig  # noqa: E402
from mechfaith.lm.layer_set import SetResult, parse_layers, train_set  # noqa: E402
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
def test_a_set_equals_each_layer_trained_alone(family, corpus_cfg, tmp_path):
    cfg = _cfg(family)
    tcfg = lm_train_config(n_steps=12, batch_size=64, log_every=6, checkpoint_every=0, jacobian_coef=0.01)
    coder_cfg = LMCoderConfig(k=4, expansion=2)
    res = train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "set", [0, 1], progress=False)
    assert res.layers == [0, 1] and res.runs[0].steps == 12 and res.runs[1].layer == 1
    saved = json.loads((tmp_path / "set" / "set.json").read_text())
    assert saved["format"] == "mechfaith.coder_set" and SetResult.from_json(saved).to_json() == saved
    collected = json.loads((tmp_path / "set" / "activations" / "collect.json").read_text())
    assert collected["layers"] == [0, 1]  # both layers in one pass
    for layer in (0, 1):
        alone = tmp_path / f"alone{layer}"
        train_coder(LMConfig(**{**cfg.__dict__, "layer": layer}), corpus_cfg, coder_cfg, tcfg, alone,
                    activations=tmp_path / "set" / "activations", progress=False)
        ours, theirs = _params(tmp_path / "set" / saved["coders"][str(layer)]), _params(alone / "coder")
        for name, p in theirs.items():
            assert torch.equal(ours[name], p), (layer, name)


def test_a_stopped_set_resumes_bit_for_bit(corpus_cfg, tmp_path, monkeypatch):
    cfg = _cfg("gpt2")
    tcfg = lm_train_config(n_steps=10, batch_size=64, log_every=5, checkpoint_every=4)
    coder_cfg = LMCoderConfig(k=4, expansion=2)
    train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "whole", [0, 1], progress=False)

    calls = {"n": 0}
    real = layer_set.LayersStream.next_batch

    def stop_after_five(self):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(layer_set.LayersStream, "next_batch", stop_after_five)
    with pytest.raises(KeyboardInterrupt):
        train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "stopped", [0, 1],
                  activations=tmp_path / "whole" / "activations", progress=False)
    assert not (tmp_path / "stopped" / "set.json").exists()
    monkeypatch.setattr(layer_set.LayersStream, "next_batch", real)
    res = train_set(cfg, corpus_cfg, coder_cfg, tcfg, tmp_path / "stopped", [0, 1],
                    activations=tmp_path / "whole" / "activations", resume=True, progress=False)
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
