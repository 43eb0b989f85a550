"""The valid inputs the generated cases damage, built once per test process (in a temporary folder removed
at exit): mechfaith coder folders, a legacy GPT-2 ``.pt``, an activation cache of random-gpt2, a demo run
with its checkpoint and a graph.json, and their corpus."""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path

import torch

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import save_coder

SAELENS = Path(__file__).resolve().parents[1] / "fixtures" / "saelens"
WORDS = "the king queen lord love death night day sword crown heart blood".split()
DEMO = ["--quiet", "--batch-size", "16", "--d-in", "8", "--n-latents", "16", "--k", "2", "--log-every", "2",
        "--checkpoint-every", "2"]


@functools.lru_cache(maxsize=None)
def root() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mechfaith-fuzz-inputs-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.lru_cache(maxsize=None)
def coder_folders() -> dict[str, Path]:
    """A TopK skip transcoder (with training metadata) and a ReLU SAE (exportable to SAELens), d_in 8."""
    g = torch.Generator().manual_seed(0)
    topk = SparseCoder(CoderConfig(d_in=8, n_latents=16, activation="topk", k=2, skip=True), generator=g)
    save_coder(topk, root() / "topk", training={"model": "random-gpt2", "layer": 1, "input_site": "mlp_in",
                                                "output_site": "mlp_out", "corpus": {"source": "shakespeare"}})
    relu = SparseCoder(CoderConfig(d_in=8, n_latents=16, activation="relu"), generator=g)
    save_coder(relu, root() / "relu", training={"model": "gpt2", "layer": 0})
    return {"topk": root() / "topk", "relu": root() / "relu"}


@functools.lru_cache(maxsize=None)
def legacy_pt() -> Path:
    """A released-format GPT-2 transcoder ``.pt`` (d_in 8, 16 latents), alone in its folder."""
    from tests.lm.test_lm_formats import LEGACY_NAME, write_legacy

    (root() / "pt").mkdir()
    write_legacy(root() / "pt" / LEGACY_NAME, d=8, n=16)
    return root() / "pt" / LEGACY_NAME


@functools.lru_cache(maxsize=None)
def texts() -> Path:
    folder = root() / "texts"
    folder.mkdir()
    rng = random.Random(4)
    for i in range(3):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(600)))
    return folder


@functools.lru_cache(maxsize=None)
def activation_cache() -> Path:
    """An activation cache of random-gpt2 layers 0 and 1 (about 120 tokens)."""
    from mechfaith.lm.collect import collect
    from mechfaith.lm.config import LMConfig
    from mechfaith.lm.corpus import CorpusConfig

    collect(LMConfig(model="random-gpt2", layer=1, train_tokens=120, batch_contexts=4),
            CorpusConfig(source=str(texts()), context_length=16, val_fraction=0.34), root() / "acts",
            layers=[0, 1], progress=False)
    return root() / "acts"


@functools.lru_cache(maxsize=None)
def demo_run() -> Path:
    """A demo run of 4 steps with its checkpoint (``train --out RUN --n-steps 4 ...DEMO``)."""
    from mechfaith.cli.main import main

    assert main(["train", "--out", str(root() / "run"), "--n-steps", "4", *DEMO]) == 0
    return root() / "run"


@functools.lru_cache(maxsize=None)
def tiny_coders() -> list[str]:
    """Two TopK skip transcoders of random-gpt2 (layers 0 and 1): ``--coders`` of circuit, graph, ..."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for layer in (0, 1):
        c = SparseCoder(CoderConfig(d_in=32, n_latents=32, activation="topk", k=4, skip=True), generator=g)
        save_coder(c, root() / f"gpt2_l{layer}", training={"model": "random-gpt2", "layer": layer,
                                                           "input_site": "mlp_in", "output_site": "mlp_out"})
        paths.append(str(root() / f"gpt2_l{layer}"))
    return paths


@functools.lru_cache(maxsize=None)
def graph_json() -> Path:
    """A graph.json as ``mechfaith graph`` writes it (tiny random model)."""
    from mechfaith.cli.main import main

    out = root() / "graph"
    assert main(["graph", "--coders", *tiny_coders(), "--prompt", "the king and", "--max-feature-nodes", "6",
                 "--check", "0", "--dashboards", "0", "--out", str(out), "--quiet"]) == 0
    return out / "graph.json"
