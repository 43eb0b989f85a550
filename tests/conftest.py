"""Shared pytest set-up.

- ``tests/`` is on ``sys.path`` (pytest's rootdir conftest), so tests import helpers as
  ``from tests.browser import open_page, require_browser`` (see tests/browser.py for the API).
- Fixture ``browser``: a headless-Chromium :class:`browser.BrowserSession` for one test; the test is
  skipped when Chromium is not installed, and FAILS instead when the environment variable CI is set.
- Fixtures ``tiny_set`` (a coder set trained once per session on ``random-gpt2``; read only) and
  ``set_copy`` (a copy of it that a test may change); ``exportable_set`` (read only) and
  ``exportable_copy``: the same set with ReLU skip transcoders (same weights), which SAELens can
  hold (it has no TopK transcoder).
"""

from __future__ import annotations

from typing import Iterator

import pytest


@pytest.fixture()
def browser() -> Iterator["object"]:
    from tests.browser import BrowserSession, require_browser

    require_browser()
    with BrowserSession() as session:
        yield session


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """A coder set as ``lm train --layers all`` writes it (``set.json``, ``layers/L<l>/coder``): TopK
    skip transcoders (k=4, 64 latents) of both layers of ``random-gpt2``, 8 steps on random words;
    trained once per session: change only a copy (:func:`set_copy`)."""
    pytest.importorskip("transformers")
    import random

    from mechfaith.lm.config import LMCoderConfig, LMConfig, lm_train_config
    from mechfaith.lm.corpus import CorpusConfig
    from mechfaith.lm.layer_set import train_set

    root = tmp_path_factory.mktemp("tiny_set")
    rng = random.Random(3)
    words = "the king queen lord love death night day sword crown heart blood".split()
    (root / "texts").mkdir()
    for i in range(3):
        (root / "texts" / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(1200)))
    corpus = CorpusConfig(source=str(root / "texts"), context_length=24, val_fraction=0.34)
    cfg = LMConfig(model="random-gpt2", train_tokens=1200, eval_contexts=4, batch_contexts=8)
    tcfg = lm_train_config(n_steps=8, batch_size=64, log_every=4, checkpoint_every=0)
    train_set(cfg, corpus, LMCoderConfig(k=4, expansion=2), tcfg, root / "set", [0, 1], progress=False)
    return root / "set"



@pytest.fixture()
def set_copy(tiny_set, tmp_path):
    """A fresh copy of :func:`tiny_set` in ``tmp_path / "set"`` that the test may change (without the
    activation cache and checkpoints, which no set-aware command reads)."""
    import shutil

    return shutil.copytree(tiny_set, tmp_path / "set", ignore=shutil.ignore_patterns("activations", "checkpoint"))


@pytest.fixture(scope="session")
def exportable_set(tiny_set, tmp_path_factory):
    """:func:`tiny_set` with every layer's TopK skip transcoder rewritten as a ReLU skip transcoder
    with the same weights: a set SAELens can hold. Read only."""
    import dataclasses
    import json
    import shutil

    from mechfaith.coders.coder import SparseCoder
    from mechfaith.coders.files import load_coder, save_coder

    root = shutil.copytree(tiny_set, tmp_path_factory.mktemp("exportable") / "set",
                           ignore=shutil.ignore_patterns("activations", "checkpoint"))
    for folder in sorted(root.glob("layers/L*/coder")):
        topk = load_coder(folder)
        coder = SparseCoder(dataclasses.replace(topk.cfg, activation="relu"))
        coder.load_state_dict(topk.state_dict())
        training = json.loads((folder / "config.json").read_text())["training"]
        save_coder(coder, folder, training=training)
    return root


@pytest.fixture()
def exportable_copy(exportable_set, tmp_path):
    """A copy of :func:`exportable_set` in ``tmp_path / "set"`` that the test may change."""
    import shutil

    return shutil.copytree(exportable_set, tmp_path / "set")
