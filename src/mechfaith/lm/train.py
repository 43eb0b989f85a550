"""``mechfaith lm train``: a transcoder (or SAE) of one layer trained by the foundation trainer
(:class:`mechfaith.training.Trainer`) from an activation cache (collected first when none is
given), initialised from the data (:func:`mechfaith.coders.init.init_from_data`) ->
``OUT/coder/`` (a mechfaith coder folder whose ``training`` metadata names the model, layer and
sites), ``OUT/metrics.jsonl``, ``OUT/checkpoint/`` and ``OUT/train.json`` (:class:`TrainCoderResult`).
Optional Jacobian matching against the model's own MLP (GELU for GPT-2/BERT, gated SiLU for Llama).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mechfaith.atomic import final_path
from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.files import save_coder
from mechfaith.coders.init import DataInit, init_from_data
from mechfaith.coders.sparse_decode import enable_sparse_decode
from mechfaith.configs import config_to_dict
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.activation_cache import ActivationCache, CachedActivationStream
from mechfaith.lm.coder_files import CODER_DIR
from mechfaith.lm.collect import cache_matches, collect
from mechfaith.lm.config import LMCoderConfig, LMConfig, check_run_configs
from mechfaith.lm.corpus import CorpusConfig
from mechfaith.lm.model_cache import get_model, resolve_layer
from mechfaith.training.checkpoint import is_checkpoint
from mechfaith.training.config import TrainConfig
from mechfaith.training.engine import TrainResult
from mechfaith.training.trainer import Trainer

log = logging.getLogger(__name__)

TRAIN_JSON = "train.json"
SPARSE_ACTIVATIONS = ("topk", "batchtopk", "jumprelu")  # coders with sparse training paths
ACTIVATIONS_DIR = "activations"
CHECKPOINT_DIR = "checkpoint"


def _columns(x: Tensor, y: Tensor, mode: str) -> tuple[Tensor, Tensor | None]:
    if mode == "xy":
        return x, y
    return (x if mode == "x" else y), None


class ColumnStream:
    """A stream served as ``(x, y)`` (transcoder), ``(x, None)`` (SAE of the input) or ``(y, None)``
    (SAE of the output); resumable through the underlying stream's state.

    With a sequence of modes, one batch per engine member: ``((x_1, ...), (y_1, ...))``, either
    all from one ``(x, y)`` (a sweep trains all its coders from one read of the cache) or, when the
    underlying stream serves one ``(x_l, y_l)`` per layer (``((x_l, ...), (y_l, ...))``), the i-th
    mode applied to the i-th layer's pair (a set of layers).
    """

    def __init__(self, stream: Any, mode: str | Sequence[str] = "xy") -> None:
        modes = [mode] if isinstance(mode, str) else list(mode)
        if not modes or any(m not in ("xy", "x", "y") for m in modes):
            raise ConfigError(f"ColumnStream modes must be xy, x or y, not {mode!r}")
        self.stream, self.mode = stream, mode

    def next_batch(self) -> tuple[Any, Any]:
        x, y = self.stream.next_batch()
        if isinstance(self.mode, str):
            return _columns(x, y, self.mode)
        if isinstance(x, tuple):
            pairs = [_columns(xi, yi, m) for xi, yi, m in zip(x, y, self.mode, strict=True)]
        else:
            pairs = [_columns(x, y, m) for m in self.mode]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


@dataclass
class LayerData:
    """Where one layer's training rows come from: an activation cache, or the model itself
    (streamed, :class:`~mechfaith.lm.model_stream.ModelActivationStream`)."""

    layer: int
    model_name: str
    d_in: int
    d_out: int
    init_rows: tuple[Tensor, Tensor]  # (x, y) rows the coder is initialised from
    source: str  # the cache folder, or "model" when streamed
    corpus: dict[str, Any] | None
    unique_tokens: int  # distinct training tokens available
    cache: ActivationCache | None = None

    @classmethod
    def from_cache(cls, cache: ActivationCache, layer: int, model_name: str) -> LayerData:
        return cls(layer, model_name, cache.d_in, cache.d_out, cache.read_shard(layer, 0), str(final_path(cache.folder)),
                   cache.index.get("extra", {}).get("corpus"), cache.n_tokens, cache)


@dataclass
class TrainCoderResult:
    """What :func:`train_coder` did (``train.json``; the first twelve fields are also the coder's
    ``training`` metadata)."""

    source: str
    model: str
    layer: int
    input_site: str
    output_site: str
    activations: str
    corpus: dict[str, Any] | None
    train_config: dict[str, Any]
    lm_coder_config: dict[str, Any]
    steps: int
    tokens: int
    status: str
    coder_config: dict[str, Any]
    coder_folder: str | None
    message: str | None
    unique_tokens: int
    epochs: float
    skip_lstsq_fve: float | None
    final_train_metrics: dict[str, float]
    train_seconds: float
    collect_seconds: float
    total_seconds: float

    def to_json(self) -> dict[str, Any]:
        return json_safe({"command": "train", **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainCoderResult:
        values: dict[str, Any] = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**values)


def check_resumable(folders: Sequence[Path], where: str | Path) -> None:
    """Raise :class:`ConfigError` (saying ``where`` it looked) unless one of ``folders`` holds a checkpoint:
    ``--resume`` with nothing to resume from is refused before any work, not started again from step 0."""
    if not any(is_checkpoint(f) for f in folders):
        raise ConfigError(f"--resume: no checkpoint in {where} (nothing to resume; start without --resume)")


def _cache_for(cfg: LMConfig, corpus_cfg: CorpusConfig, out: Path, activations: str | Path | None,
               progress: bool) -> tuple[ActivationCache, int, LMConfig, float]:
    """The activation cache to train from, the layer, ``cfg`` with the cache's sites, and the
    seconds spent collecting (the cache is collected into ``out/activations`` unless given)."""
    collect_seconds = 0.0
    if activations is None:
        lm = get_model(cfg)
        layer = resolve_layer(lm.adapter, cfg.layer)
        folder = out / ACTIVATIONS_DIR
        if cache_matches(folder, lm.name, layer, cfg, corpus_cfg):
            log.info("reusing the activation cache in %s", folder)
        else:
            collect_seconds = collect(cfg, corpus_cfg, folder, layers=[layer], progress=progress).seconds
        return ActivationCache(folder), layer, cfg, collect_seconds
    cache = ActivationCache(Path(activations))
    found = cache.layers[0] if cfg.layer == -1 and len(cache.layers) == 1 else None
    if found is None:
        found = resolve_layer(get_model(cfg).adapter, cfg.layer) if cfg.layer == -1 else cfg.layer
    cache.shards(found)  # a one-line error when the cache lacks the layer
    cfg = dataclasses.replace(cfg, input_site=cache.index.get("input_site", cfg.input_site),
                              output_site=cache.index.get("output_site", cfg.output_site))
    return cache, found, cfg, collect_seconds


def _coder_layout(cfg: LMConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig, data: LayerData,
                  sae_site: str) -> tuple[CoderConfig, str, str, str]:
    """The coder's config, the stream mode (xy / x / y) and the coder's input and output sites."""
    check_run_configs(coder_cfg, train_cfg, sae_site)
    if coder_cfg.kind == "sae":
        d = data.d_in if sae_site == "input" else data.d_out
        site = cfg.input_site if sae_site == "input" else cfg.output_site
        mode = "x" if sae_site == "input" else "y"
        ccfg, in_site, out_site = coder_cfg.coder_config(d, d), site, site
    else:
        ccfg = coder_cfg.coder_config(data.d_in, data.d_out)
        mode, in_site, out_site = "xy", cfg.input_site, cfg.output_site
    return ccfg, mode, in_site, out_site


@dataclass
class CoderRun:
    """One coder of one layer, initialised from the data and set up to train (:func:`prepare_coder_run`)."""

    out: Path
    trainer: Trainer
    mode: str  # the columns it trains on: xy (transcoder), x or y (SAE)
    data: LayerData
    coder_config: CoderConfig
    lm_coder_config: LMCoderConfig
    input_site: str
    output_site: str
    init: DataInit
    collect_seconds: float
    started: float  # perf_counter() when the run was set up

    @property
    def layer(self) -> int:
        return self.data.layer

    @property
    def model_name(self) -> str:
        return self.data.model_name

    def stream(self, modes: str | Sequence[str] | None = None) -> ColumnStream:
        """The cached batches this run trains on (the seed is the TrainConfig's); ``modes``: serve
        them to several runs at once instead (see :class:`ColumnStream`)."""
        if self.data.cache is None:
            raise ConfigError(f"layer {self.layer} is trained from the model's stream, not from a cache")
        tcfg = self.trainer.cfg
        return ColumnStream(CachedActivationStream(self.data.cache, self.layer, tcfg.batch_size, seed=tcfg.seed,
                                                   device=tcfg.device), self.mode if modes is None else modes)


def prepare_coder_run(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
                      out: str | Path, *, activations: str | Path | None = None, data: LayerData | None = None,
                      sae_site: str = "input", progress: bool = True) -> CoderRun:
    """Everything :func:`train_coder` does before the training loop (see there). ``data``: the
    layer's rows come from there (e.g. the model's stream) instead of an activation cache."""
    out = Path(out)
    t_start = time.perf_counter()
    collect_seconds = 0.0
    if data is None:
        cache, layer, cfg, collect_seconds = _cache_for(cfg, corpus_cfg, out, activations, progress)
        data = LayerData.from_cache(cache, layer, str(cache.index.get("model", cfg.model)))
    ccfg, mode, in_site, out_site = _coder_layout(cfg, coder_cfg, train_cfg, data, sae_site)
    reference = None
    if train_cfg.jacobian_coef > 0:
        lm = get_model(dataclasses.replace(cfg, model=data.model_name))
        reference = lm.adapter.mlp_function(data.layer, cfg.input_site, cfg.output_site)
    train_cfg = dataclasses.replace(train_cfg, device=cfg.device)

    coder = SparseCoder(ccfg, generator=torch.Generator().manual_seed(coder_cfg.init_seed))
    if coder_cfg.sparse_decode and ccfg.activation in SPARSE_ACTIVATIONS:
        enable_sparse_decode(coder)
    first_x, first_y = data.init_rows
    rows_x = first_y if mode == "y" else first_x
    init = init_from_data(coder, rows_x, first_y if mode == "xy" else rows_x,
                          skip_init=coder_cfg.skip_init, latent_init_fraction=coder_cfg.latent_init_fraction,
                          center_encoder=coder_cfg.center_encoder)
    if init.skip_fve is not None:
        log.info("least-squares skip initialisation explains %.3f of the variance", init.skip_fve)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(coder, train_cfg, reference, log_path=out / "metrics.jsonl",
                      checkpoint_dir=out / CHECKPOINT_DIR, progress=progress, desc=f"train L{data.layer}",
                      name=final_path(out).name)
    return CoderRun(out, trainer, mode, data, ccfg, coder_cfg, in_site, out_site, init, collect_seconds, t_start)


def finish_coder_run(run: CoderRun, result: TrainResult) -> TrainCoderResult:
    """Save the trained coder (when training completed) and ``train.json``; raise if it diverged."""
    coder, out, data = run.trainer.coder, run.out, run.data
    coder.eval()
    meta: dict[str, Any] = {
        "source": "mechfaith lm train", "model": run.model_name, "layer": run.layer, "input_site": run.input_site,
        "output_site": run.output_site, "activations": data.source, "corpus": data.corpus,
        "train_config": config_to_dict(run.trainer.cfg), "lm_coder_config": config_to_dict(run.lm_coder_config),
        "steps": result.steps_done, "tokens": result.tokens_seen, "status": result.status,
    }
    if result.ok:
        save_coder(coder, out / CODER_DIR, training=json_safe(meta))
    final: dict[str, float] = {k: v for k in ("fve", "mse", "l0", "dead_frac", "loss", "jacobian_rel")
                               if (v := result.final_metrics.get(k)) is not None}
    summary = TrainCoderResult(
        **meta, coder_config=config_to_dict(run.coder_config),
        coder_folder=str(final_path(out / CODER_DIR)) if result.ok else None, message=result.message,
        unique_tokens=data.unique_tokens, epochs=result.tokens_seen / max(data.unique_tokens, 1),
        skip_lstsq_fve=run.init.skip_fve, final_train_metrics=final, train_seconds=round(result.elapsed_s, 2),
        collect_seconds=run.collect_seconds, total_seconds=round(time.perf_counter() - run.started, 2))
    write_json(out / TRAIN_JSON, summary.to_json())
    if not result.ok:
        raise TrainingDiverged(result.message or "training diverged")
    return summary


def train_coder(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
                out: str | Path, *, activations: str | Path | None = None, sae_site: str = "input",
                resume: bool = False, progress: bool = True) -> TrainCoderResult:
    """Train one coder of ``cfg.layer`` and write ``out/coder``, ``out/train.json`` and the log.

    ``activations``: an existing cache folder (else one is collected into ``out/activations``, or
    reused from there when it was collected with the same settings). ``sae_site``: for an SAE,
    whether it reconstructs the cached ``input`` or ``output`` site.
    """
    check_run_configs(coder_cfg, train_cfg, sae_site)
    if resume:
        check_resumable([Path(out) / CHECKPOINT_DIR], Path(out) / CHECKPOINT_DIR)
    run = prepare_coder_run(cfg, corpus_cfg, coder_cfg, train_cfg, out, activations=activations,
                            sae_site=sae_site, progress=progress)
    return finish_coder_run(run, run.trainer.fit(run.stream(), resume=resume))
