"""A transcoder (or SAE) at every requested layer, trained together: a replacement set.

:func:`train_set` trains one coder per layer in one :class:`~mechfaith.training.engine.Engine`:
each layer's :class:`~mechfaith.training.trainer.Trainer` keeps its own Adam, schedules, dead-latent
state and optional Jacobian matching against its own MLP, and all of them step together on one
batch per layer. The batches come

- by default straight from the model (:class:`~mechfaith.lm.model_stream.ModelActivationStream`):
  one forward pass per block of text, stopping after the last layer, captures every layer at once;
  memory is one block of rows per layer (``LMConfig.stream_block_tokens``), not the corpus, and
  nothing is written to disk. Each coder is initialised from the first block's rows;
- or from an activation cache collected beforehand (``activations=``, e.g. ``lm collect --layers
  all``, bfloat16 shards if wanted), which several sets and sweeps can reuse (:class:`LayersStream`).
  Every layer then ends exactly as :func:`~mechfaith.lm.train.train_coder` would train it alone
  from the same cache (a test checks).

A stopped run resumes from the layers' checkpoints together, bit for bit (the stream's position is
in every checkpoint; the model stream recomputes the block it was in).

Under torchrun (``torchrun --nproc_per_node N -m mechfaith lm train --layers all ...``) the
processes share the layers (:mod:`mechfaith.lm.distributed`): each streams, or reads from the
cache, only its contiguous share and trains those coders, each exactly as one process would; a
stopped set resumes with the same number of processes, each rank from its own layers'
checkpoints; rank 0 writes ``set.json`` from every rank's summaries, and a failure on any rank
(a diverged layer included) makes every rank raise. The folder must be one all ranks see.

Outputs in the set folder: ``layers/L<l>/`` (one ``lm train`` run folder per layer: ``coder/``,
``metrics.jsonl``, ``checkpoint/``, ``train.json``) and ``set.json`` (:class:`SetResult`, the
manifest: model, layers, sites, each layer's coder folder, the training summaries).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

from mechfaith.configs import config_to_dict
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.activations import ActivationConfig
from mechfaith.lm.coder_files import CODER_DIR
from mechfaith.lm.collect import check_sites, training_contexts
from mechfaith.lm.config import LMCoderConfig, LMConfig, check_run_configs
from mechfaith.lm.corpus import CorpusConfig
from mechfaith.lm.distributed import join_ranks, share_costs, split_layers
from mechfaith.lm.model_cache import get_model, resolve_layer
from mechfaith.lm.model_stream import ModelActivationStream
from mechfaith.lm.train import (
    CHECKPOINT_DIR,
    ColumnStream,
    LayerData,
    TrainCoderResult,
    check_resumable,
    finish_coder_run,
    prepare_coder_run,
)
from mechfaith.training.config import TrainConfig
from mechfaith.training.engine import Engine

SET_JSON = "set.json"
STREAMED = "model (streamed, no cache)"
SET_FORMAT = "mechfaith.coder_set"
SET_FORMAT_VERSION = 1
LAYERS_DIR = "layers"


def layer_ranges(spec: str) -> list[tuple[int, int]] | None:
    """The syntax of ``--layers`` (checked before the model is loaded): None for ``all``, else the
    inclusive ranges ``(first, last)`` of a range ``a-b`` or a comma-separated list of layers and ranges."""
    text = spec.strip().lower()
    if text == "all":
        return None
    ranges: list[tuple[int, int]] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                ranges.append((int(lo), int(hi)))
            elif part.strip():
                ranges.append((int(part), int(part)))
    except ValueError:
        raise ConfigError(f"--layers must be 'all', a range like 0-29 or a list like 1,3,5; got {spec!r}") from None
    if not ranges or any(lo < 0 or lo > hi for lo, hi in ranges):
        raise ConfigError(f"--layers {spec!r}: give layers >= 0 and ranges first-last with first <= last")
    return ranges


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``all``, a range ``a-b`` (inclusive) or a comma-separated list -> sorted distinct layers."""
    ranges = layer_ranges(spec)
    if ranges is None:
        return list(range(n_layers))
    bad = sorted({hi for _, hi in ranges if hi >= n_layers})
    if bad:
        raise ConfigError(f"--layers {spec!r}: the model has layers 0..{n_layers - 1} (not {bad})")
    return sorted({layer for lo, hi in ranges for layer in range(lo, hi + 1)})


class LayersStream:
    """One batch per layer, ``((x_l, ...), (y_l, ...))``, from one stream per layer; its state is
    every layer's (so a set resumes where it stopped)."""

    def __init__(self, streams: dict[int, ColumnStream]) -> None:
        if not streams:
            raise ConfigError("LayersStream needs at least one layer")
        self.streams = dict(streams)

    def next_batch(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        pairs = [s.next_batch() for s in self.streams.values()]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "layers", "layers": {str(l): s.state_dict() for l, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("layers") if state.get("kind") == "layers" else None
        if not isinstance(saved, dict) or sorted(saved) != sorted(str(l) for l in self.streams):
            raise ConfigError(f"the stream state is not one of layers {sorted(self.streams)}")
        for l, s in self.streams.items():
            s.load_state_dict(saved[str(l)])


@dataclass
class SetResult:
    """A trained set (``set.json``, the manifest every set-aware command reads)."""

    model: str
    layers: list[int]
    input_site: str
    output_site: str
    coders: dict[str, str]  # layer -> coder folder, relative to the set folder
    activations: str
    runs: list[TrainCoderResult]
    train_seconds: float
    total_seconds: float

    def to_json(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "runs"}
        return json_safe({"format": SET_FORMAT, "format_version": SET_FORMAT_VERSION, **body,
                          "runs": [r.to_json() for r in self.runs]})

    @classmethod
    def from_json(cls, data: Any) -> SetResult:
        """The manifest from its JSON, every field's type checked: a foreign, incomplete or mistyped
        manifest, or a coder path that is absolute or climbs out of the set folder (``..``), raises
        :class:`ConfigError` naming the field (whether the coders exist is for
        :func:`~mechfaith.lm.coder_set.read_set`, which knows the folder)."""
        if not isinstance(data, dict) or data.get("format") != SET_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"not a mechfaith coder set (format {found!r})")
        if data.get("format_version") != SET_FORMAT_VERSION:
            raise ConfigError(f"format_version {data.get('format_version')!r} is not supported "
                              f"(this mechfaith reads {SET_FORMAT_VERSION})")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ConfigError(f"missing field(s) {', '.join(missing)}")
        for name in ("model", "input_site", "output_site", "activations"):
            _check(isinstance(data[name], str), name, "a string")
        for name in ("train_seconds", "total_seconds"):
            _check(_is_number(data[name]), name, "a number")
        layers = data["layers"]
        _check(isinstance(layers, list) and bool(layers) and all(_is_int(l) and l >= 0 for l in layers)
               and layers == sorted(set(layers)), "layers", "a non-empty ascending list of distinct layer numbers")
        coders = data["coders"]
        _check(isinstance(coders, dict) and sorted(coders) == sorted(str(l) for l in layers), "coders",
               f"an object with one coder folder per layer ({', '.join(map(str, layers))})")
        for key, rel in coders.items():
            _check(isinstance(rel, str) and bool(rel) and not PurePosixPath(rel).is_absolute()
                   and ".." not in PurePosixPath(rel).parts, f"coders[{key!r}]",
                   f"a folder inside the set (relative, without '..'), not {rel!r}")
        runs = data["runs"]
        _check(isinstance(runs, list) and len(runs) == len(layers), "runs", "a list of one run per layer")
        for i, (l, run) in enumerate(zip(layers, runs)):
            metrics = run.get("final_train_metrics") if isinstance(run, dict) else None
            _check(isinstance(run, dict) and _is_int(run.get("layer")) and run["layer"] == l
                   and isinstance(run.get("coder_config"), dict) and isinstance(metrics, dict)
                   and all(v is None or _is_number(v) for v in metrics.values()), f"runs[{i}]",
                   f"layer {l}'s training summary (its layer, coder_config and final_train_metrics of numbers)")
        return cls(**{k: data[k] for k in names if k != "runs"}, runs=[TrainCoderResult.from_json(r) for r in runs])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"field {field} must be {expected}")


def layers_text(layers: Iterable[int]) -> str:
    """Layers as ``--layers`` reads them, runs shortened: [0, 1, 2, 5] -> ``0-2,5``."""
    runs: list[list[int]] = []
    for l in sorted(set(layers)):
        if runs and runs[-1][1] == l - 1:
            runs[-1][1] = l
        else:
            runs.append([l, l])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def model_stream(cfg: LMConfig, corpus_cfg: CorpusConfig, layers: list[int], train_cfg: TrainConfig
                 ) -> tuple[ModelActivationStream, list[LayerData]]:
    """The batches of every layer straight from the model (about ``cfg.train_tokens`` distinct
    training tokens, seeded by the training seed) and each layer's data, initialised from the first block."""
    lm = get_model(cfg)
    check_sites(lm.adapter, cfg)
    contexts, unique_tokens = training_contexts(lm, cfg, corpus_cfg)
    act_cfg = ActivationConfig(layers=list(layers), input_site=cfg.input_site, output_site=cfg.output_site,
                               batch_contexts=cfg.batch_contexts, exclude_bos=cfg.exclude_bos,
                               buffer_tokens=cfg.stream_block_tokens, batch_size=train_cfg.batch_size,
                               seed=train_cfg.seed)
    stream = ModelActivationStream(lm.adapter, contexts, layers, act_cfg, device=cfg.device,
                                   max_norm_ratio=cfg.massive_ratio)
    corpus = config_to_dict(corpus_cfg)
    data = [LayerData(layer, lm.name, int(x.shape[1]), int(y.shape[1]), (x, y), STREAMED, corpus, unique_tokens)
            for layer, (x, y) in zip(layers, stream.current_block())]
    return stream, data


def _train_share(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
                 out: Path, layers: list[int], activations: str | Path | None, sae_site: str, resume: bool,
                 progress: bool, desc: str) -> dict[str, Any]:
    """Train the coders of ``layers`` together in one engine (this process's share of the set):
    ``{"runs": [each layer's TrainCoderResult as JSON], "train_seconds": ...}``."""
    if not layers:  # more processes than layers
        return {"runs": [], "train_seconds": 0.0}
    stream: LayersStream | ColumnStream
    if activations is None:
        model_batches, data = model_stream(cfg, corpus_cfg, layers, train_cfg)
        runs = [prepare_coder_run(dataclasses.replace(cfg, layer=d.layer), corpus_cfg, coder_cfg, train_cfg,
                                  out / LAYERS_DIR / f"L{d.layer}", data=d, sae_site=sae_site, progress=progress)
                for d in data]
        stream = ColumnStream(model_batches, [r.mode for r in runs])
    else:
        runs = [prepare_coder_run(dataclasses.replace(cfg, layer=l), corpus_cfg, coder_cfg, train_cfg,
                                  out / LAYERS_DIR / f"L{l}", activations=activations, sae_site=sae_site,
                                  progress=progress) for l in layers]
        stream = LayersStream({r.layer: r.stream() for r in runs})
    try:
        results = Engine([r.trainer for r in runs], desc=desc).fit(stream, resume=resume)
    except ConfigError as exc:
        if not resume:
            raise
        raise ConfigError(f"{exc} (a stopped set resumes with as many processes as trained it)") from None
    summaries: list[TrainCoderResult] = []
    diverged: TrainingDiverged | None = None
    for run, res in zip(runs, results):
        try:
            summaries.append(finish_coder_run(run, res))
        except TrainingDiverged as exc:  # every layer's train.json is written first
            diverged = diverged or exc
    if diverged is not None:
        raise diverged
    return {"runs": [s.to_json() for s in summaries], "train_seconds": round(results[0].elapsed_s, 2)}


def train_set(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
              out: str | Path, layers: Sequence[int] | str, *, activations: str | Path | None = None,
              sae_site: str = "input", resume: bool = False, progress: bool = True) -> SetResult:
    """Train one coder per layer of ``layers`` (a list, or a ``--layers`` text like ``all``) together
    (module docstring); write ``out/set.json``. ``activations``: train from this cache instead of the
    model's stream. ``sae_site``: for SAEs, whether they reconstruct the ``input`` or ``output`` site.
    Under torchrun the ranks share the layers (:mod:`mechfaith.lm.distributed`) and every rank
    returns the same result; the progress bar is rank 0's."""
    out = Path(out)
    t0 = time.perf_counter()
    check_run_configs(coder_cfg, train_cfg, sae_site)
    if resume:
        check_resumable(list((out / LAYERS_DIR).glob(f"L*/{CHECKPOINT_DIR}")), out / LAYERS_DIR / f"L*/{CHECKPOINT_DIR}")
    ranks = join_ranks(cfg.device)
    try:
        cfg = dataclasses.replace(cfg, device=ranks.device)

        def load_first() -> None:  # rank 0 loads the model before the others: a first-use conversion runs once
            if ranks.is_main:
                get_model(cfg)

        ranks.run(load_first)

        def share() -> tuple[list[int], dict[str, Any]]:
            adapter = get_model(cfg).adapter
            wanted = parse_layers(layers, adapter.n_layers) if isinstance(layers, str) else layers
            chosen = sorted({resolve_layer(adapter, l) for l in wanted})
            if not chosen:
                raise ConfigError("a set needs at least one layer")
            costs = share_costs(adapter, coder_cfg, train_cfg, streamed=activations is None)
            mine = split_layers(chosen, ranks.world_size, forward_cost=costs[0], coder_cost=costs[1])[ranks.rank]
            desc = (f"set of {len(chosen)} layers" if ranks.world_size == 1 else
                    f"rank 0 of {ranks.world_size}: {len(mine)} of {len(chosen)} layers")
            return chosen, _train_share(cfg, corpus_cfg, coder_cfg, train_cfg, out, mine, activations, sae_site,
                                        resume, progress and ranks.is_main, desc)

        shares = ranks.run(share)
        chosen = list(shares[0][0])
        summaries = sorted((TrainCoderResult.from_json(r) for _, s in shares for r in s["runs"]),
                           key=lambda r: r.layer)

        def write() -> dict[str, Any] | None:
            if not ranks.is_main:
                return None
            first = summaries[0]
            result = SetResult(
                model=first.model, layers=chosen, input_site=first.input_site, output_site=first.output_site,
                coders={str(l): str(Path(LAYERS_DIR) / f"L{l}" / CODER_DIR) for l in chosen},
                activations=str(activations) if activations is not None else STREAMED, runs=summaries,
                train_seconds=max(float(s["train_seconds"]) for _, s in shares),
                total_seconds=round(time.perf_counter() - t0, 2))
            manifest = result.to_json()
            write_json(out / SET_JSON, manifest)
            return manifest

        return SetResult.from_json(ranks.run(write)[0])
    finally:
        ranks.close()
