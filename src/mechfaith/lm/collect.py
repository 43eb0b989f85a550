"""``mechfaith lm collect``: a model's (input, output) pairs of one or several layers over the
training split of a corpus -> an activation cache folder (:mod:`mechfaith.lm.activation_cache`) with
``collect.json`` (:class:`CollectResult`) inside it; :func:`cache_matches` tells whether a folder
already holds a cache collected with given settings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mechfaith.atomic import final_path
from mechfaith.configs import config_to_dict
from mechfaith.errors import CoderFileError, ConfigError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.activation_cache import INDEX_NAME, ActivationCache, write_activation_cache
from mechfaith.lm.activations import ActivationConfig
from mechfaith.lm.adapters import ModelAdapter
from mechfaith.lm.config import LMConfig
from mechfaith.lm.corpus import Corpus, CorpusConfig, get_corpus
from mechfaith.lm.model_cache import get_model, resolve_layer
from mechfaith.lm.models import LoadedModel

log = logging.getLogger(__name__)

COLLECT_JSON = "collect.json"


@dataclass
class CollectResult:
    """What :func:`collect` collected (``collect.json``)."""

    model: str
    family: str
    n_layers: int
    layers: list[int]
    input_site: str
    output_site: str
    d_in: int
    d_out: int
    n_contexts: int
    context_length: int
    n_tokens: int
    exclude_bos: bool
    seconds: float
    tokens_per_second: float
    train_documents: int
    val_documents: list[str]
    folder: str

    def to_json(self) -> dict[str, Any]:
        return json_safe({"command": "collect", **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CollectResult:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def check_sites(adapter: ModelAdapter, cfg: LMConfig) -> None:
    """A one-line error for sites the model does not have."""
    if cfg.output_site == "mlp_out_centered" and adapter.family.norm_kind != "layernorm":
        raise ConfigError(f"output_site mlp_out_centered needs a LayerNorm model; {adapter.family.name} "
                          f"uses {adapter.family.norm_kind} (use mlp_out)")


def training_contexts(lm: LoadedModel, cfg: LMConfig, corpus_cfg: CorpusConfig, corpus: Corpus | None = None
                      ) -> tuple[Tensor, int]:
    """The first training contexts holding about ``cfg.train_tokens`` tokens (BOS left out when
    excluded; all of them when the corpus is smaller) and the number of tokens they hold."""
    corpus = corpus or get_corpus(lm, corpus_cfg)
    per_context = corpus_cfg.context_length - (1 if cfg.exclude_bos else 0)
    n_contexts = math.ceil(cfg.train_tokens / per_context)
    available = int(corpus.train.shape[0])
    if n_contexts > available:
        log.warning("the corpus has only %d training contexts (%d tokens); using all of them",
                    available, available * per_context)
        n_contexts = available
    return corpus.train[:n_contexts], n_contexts * per_context


def collect(cfg: LMConfig, corpus_cfg: CorpusConfig, folder: str | Path, *,
            layers: list[int] | None = None, progress: bool = True) -> CollectResult:
    """Collect ``layers`` (default: ``cfg.layer``) in one pass over about ``cfg.train_tokens``
    training tokens into ``folder``; returns (and writes as ``collect.json`` inside it) the summary."""
    folder = Path(folder)
    lm = get_model(cfg)
    adapter = lm.adapter
    check_sites(adapter, cfg)
    layers = [resolve_layer(adapter, l) for l in (layers or [cfg.layer])]
    corpus = get_corpus(lm, corpus_cfg)
    contexts, _ = training_contexts(lm, cfg, corpus_cfg, corpus)
    n_contexts = int(contexts.shape[0])
    act_cfg = ActivationConfig(layers=layers, input_site=cfg.input_site, output_site=cfg.output_site,
                               batch_contexts=cfg.batch_contexts, exclude_bos=cfg.exclude_bos,
                               storage_dtype=cfg.storage_dtype, seed=corpus_cfg.seed)
    extra = {"lm": config_to_dict(cfg), "corpus": config_to_dict(corpus_cfg)}
    t0 = time.perf_counter()
    write_activation_cache(adapter, contexts, act_cfg, folder, model_name=lm.name,
                           progress=progress, extra=extra)
    seconds = time.perf_counter() - t0
    cache = ActivationCache(folder)
    result = CollectResult(
        model=lm.name, family=adapter.family.name, n_layers=adapter.n_layers, layers=layers,
        input_site=cfg.input_site, output_site=cfg.output_site, d_in=cache.d_in, d_out=cache.d_out,
        n_contexts=n_contexts, context_length=corpus_cfg.context_length, n_tokens=cache.n_tokens,
        exclude_bos=cfg.exclude_bos, seconds=round(seconds, 2),
        tokens_per_second=round(n_contexts * corpus_cfg.context_length / seconds, 1),
        train_documents=len(corpus.train_documents), val_documents=corpus.val_documents, folder=str(final_path(folder)))
    write_json(folder / COLLECT_JSON, result.to_json())
    return result


def cache_matches(folder: Path, lm_name: str, layer: int, cfg: LMConfig, corpus_cfg: CorpusConfig) -> bool:
    """Whether ``folder`` holds a cache collected with these settings (so it can be reused)."""
    if not (folder / INDEX_NAME).is_file():
        return False
    try:
        cache = ActivationCache(folder)
    except CoderFileError:
        return False
    idx = cache.index
    extra = idx.get("extra", {})
    old_lm = extra.get("lm", {})
    return (idx.get("model") == lm_name and layer in cache.layers
            and idx.get("input_site") == cfg.input_site and idx.get("output_site") == cfg.output_site
            and extra.get("corpus") == config_to_dict(corpus_cfg)
            and old_lm.get("train_tokens") == cfg.train_tokens
            and old_lm.get("exclude_bos") == cfg.exclude_bos
            and old_lm.get("storage_dtype") == cfg.storage_dtype)
