"""``mechfaith lm train --clt --layers A-B``: a cross-layer transcoder over a contiguous block of a
language model's layers, trained straight from the model's stream.

One forward pass per block of text captures every block layer's MLP input and output at the same
tokens (:class:`~mechfaith.lm.model_stream.ModelActivationStream`, attention sinks left out at every
layer alike), stacked layer-major into the CLT's batches (:class:`BlockStream`). The CLT is
initialised from the first block (:func:`~mechfaith.coders.clt_init.init_clt_from_data`) and trained
by :class:`~mechfaith.training.clt_trainer.CLTTrainer` (checkpoints with exact resume; optional
Jacobian matching of each layer's local Jacobian against the model's own MLP).

Outputs in the run folder: ``clt/`` (a mechfaith CLT folder whose ``training`` metadata names the
model, the block and the sites), ``metrics.jsonl``, ``checkpoint/`` and ``train.json``
(:class:`CLTTrainResult`).

The coder options are :class:`~mechfaith.lm.config.LMCoderConfig`'s: ``n_latents`` (per layer; 0:
``expansion x d_in``), ``activation`` (topk, relu or jumprelu), ``k`` (per layer), ``skip``,
``skip_init``, ``latent_init_fraction``, ``center_encoder``, ``init_seed``, the JumpReLU threshold and
bandwidth; ``reach`` limits how many later layers each latent writes to. Memory: the decoders hold
``n d L (L + 1) / 2`` numbers (a 6-layer block of SmolLM2-135M with 1024 latents per layer: 12.4M).

Under torchrun (``torchrun --nproc_per_node N -m mechfaith lm train --clt --layers A-B ...``) the
processes train data-parallel (:mod:`mechfaith.training.distributed`): each streams the same global
batches (the model's forward pass is repeated on every rank) and trains on its share of the rows,
gradients averaged, so N processes train the weights one process would; rank 0 writes the log,
the checkpoints and the CLT. The batch size must be a multiple of N.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mechfaith.atomic import final_path
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLT_ACTIVATIONS, CLTConfig
from mechfaith.coders.clt_files import RUN_DIR, save_clt
from mechfaith.coders.clt_init import init_clt_from_data
from mechfaith.configs import config_to_dict
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.config import LMCoderConfig, LMConfig
from mechfaith.lm.corpus import CorpusConfig
from mechfaith.lm.distributed import SetRanks, join_ranks
from mechfaith.lm.layer_set import STREAMED, model_stream, parse_layers
from mechfaith.lm.model_cache import get_model, resolve_layer
from mechfaith.lm.model_stream import ModelActivationStream
from mechfaith.lm.train import CHECKPOINT_DIR, TRAIN_JSON, check_resumable
from mechfaith.training import distributed as ddp
from mechfaith.training.clt_trainer import CLTTrainer
from mechfaith.training.config import TrainConfig

CLT_DIR = RUN_DIR
METRICS_NAME = "metrics.jsonl"
CLT_RUN_NAMES = (CLT_DIR, TRAIN_JSON, METRICS_NAME, CHECKPOINT_DIR, "eval.json")


class BlockStream:
    """The CLT's batches ``(x [L, B, d_in], y [L, B, d_out])`` from a multi-layer model stream."""

    def __init__(self, stream: ModelActivationStream) -> None:
        self.stream = stream

    def next_batch(self) -> tuple[Tensor, Tensor]:
        xs, ys = self.stream.next_batch()
        return torch.stack(list(xs)), torch.stack(list(ys))

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


@dataclass
class CLTTrainResult:
    """What :func:`train_clt_block` did (``train.json``)."""

    source: str
    model: str
    layers: list[int]
    input_site: str
    output_site: str
    activations: str
    corpus: dict[str, Any] | None
    train_config: dict[str, Any]
    lm_coder_config: dict[str, Any]
    clt_config: dict[str, Any]
    n_parameters: int
    steps: int
    tokens: int
    status: str
    clt_folder: str | None
    message: str | None
    unique_tokens: int
    skip_lstsq_fve: list[float | None]
    final_train_metrics: dict[str, float]
    train_seconds: float
    total_seconds: float

    def to_json(self) -> dict[str, Any]:
        return json_safe({"command": "train-clt", **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CLTTrainResult:
        values: dict[str, Any] = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        return cls(**values)


def check_block(layers: Sequence[int]) -> list[int]:
    """The layers sorted, if they form a contiguous block of at least one layer."""
    chosen = sorted(set(int(l) for l in layers))
    if not chosen:
        raise ConfigError("a CLT needs at least one layer")
    if chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise ConfigError(f"a CLT covers a contiguous block of layers, not {chosen}")
    return chosen


def clt_config_for(coder_cfg: LMCoderConfig, train_cfg: TrainConfig, d_in: int, d_out: int, layers: Sequence[int],
                   reach: int | None) -> CLTConfig:
    """The CLT's configuration from the LM coder options (checked against the training options)."""
    if coder_cfg.kind != "transcoder":
        raise ConfigError("a CLT is a transcoder (--kind transcoder)")
    if coder_cfg.activation not in CLT_ACTIVATIONS:
        raise ConfigError(f"a CLT's activation is one of {', '.join(CLT_ACTIVATIONS)}, not {coder_cfg.activation!r}")
    if coder_cfg.activation == "relu" and train_cfg.sparsity not in ("l1", "tanh_l1"):
        raise ConfigError("a ReLU CLT needs a sparsity penalty: --sparsity l1 or tanh_l1")
    if coder_cfg.activation == "jumprelu" and train_cfg.sparsity not in ("l0", "tanh_l1"):
        raise ConfigError("a JumpReLU CLT is trained with --sparsity l0 or tanh_l1")
    if train_cfg.sparsity == "l0" and coder_cfg.activation != "jumprelu":
        raise ConfigError("the l0 penalty needs a JumpReLU CLT (--activation jumprelu)")
    n = coder_cfg.n_latents or coder_cfg.expansion * d_in
    block = check_block(layers)
    return CLTConfig(n_layers=len(block), d_in=d_in, n_latents=n, d_out=d_out, first_layer=block[0], reach=reach,
                     activation=coder_cfg.activation, k=min(coder_cfg.k, n),
                     jumprelu_threshold=coder_cfg.jumprelu_threshold,
                     jumprelu_bandwidth=coder_cfg.jumprelu_bandwidth, skip=coder_cfg.skip)


def train_clt_block(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
                    out: str | Path, layers: Sequence[int] | str, *, reach: int | None = None, resume: bool = False,
                    progress: bool = True) -> CLTTrainResult:
    """Train a CLT over ``layers`` (a contiguous block; a list or a ``--layers`` text) and write the
    run folder ``out`` (module docstring)."""
    t0 = time.perf_counter()
    out = Path(out)
    if resume:
        check_resumable([out / CHECKPOINT_DIR], out / CHECKPOINT_DIR)
    ranks = join_ranks(cfg.device)
    try:
        return _train(dataclasses.replace(cfg, device=ranks.device), corpus_cfg, coder_cfg, train_cfg, out, layers,
                      reach, resume, progress and ranks.is_main, ranks, t0)
    finally:
        ranks.close()


def _train(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig, out: Path,
           layers: Sequence[int] | str, reach: int | None, resume: bool, progress: bool, ranks: SetRanks,
           t0: float) -> CLTTrainResult:
    lm = get_model(cfg)
    wanted = parse_layers(layers, lm.adapter.n_layers) if isinstance(layers, str) else list(layers)
    block = check_block([resolve_layer(lm.adapter, l) for l in wanted])
    stream, data = model_stream(cfg, corpus_cfg, block, train_cfg)
    d_in, d_out = data[0].d_in, data[0].d_out
    ccfg = clt_config_for(coder_cfg, train_cfg, d_in, d_out, block, reach)
    clt = CrossLayerTranscoder(ccfg, generator=torch.Generator().manual_seed(coder_cfg.init_seed))
    x0 = torch.stack([d.init_rows[0] for d in data]).float()
    y0 = torch.stack([d.init_rows[1] for d in data]).float()
    inits = init_clt_from_data(clt, x0, y0, skip_init=coder_cfg.skip_init,
                               latent_init_fraction=coder_cfg.latent_init_fraction,
                               center_encoder=coder_cfg.center_encoder)
    references = None
    if train_cfg.jacobian_coef > 0:
        references = [lm.adapter.mlp_function(l, cfg.input_site, cfg.output_site) for l in block]
    train_cfg = dataclasses.replace(train_cfg, device=cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    trainer = CLTTrainer(clt, train_cfg, references, log_path=out / METRICS_NAME, checkpoint_dir=out / CHECKPOINT_DIR,
                         progress=progress, desc=f"train CLT L{block[0]}-{block[-1]}")
    # under torchrun: data parallel, every rank streams the same global batches and trains on its rows
    ddp.attach(trainer, ranks.ctx)
    result = ddp.fit(trainer, BlockStream(stream), ranks.ctx, resume=resume, row_dim=1)
    meta: dict[str, Any] = {
        "source": "mechfaith lm train --clt", "model": lm.name, "layers": block, "input_site": cfg.input_site,
        "output_site": cfg.output_site, "activations": STREAMED, "corpus": config_to_dict(corpus_cfg),
        "train_config": config_to_dict(train_cfg), "lm_coder_config": config_to_dict(coder_cfg),
        "steps": result.steps_done, "tokens": result.tokens_seen, "status": result.status}
    clt.eval()
    if result.ok and ranks.is_main:
        save_clt(clt, out / CLT_DIR, training=json_safe(meta))
    final = {k: v for k in ("fve", "mse", "l0", "l0_token", "dead_frac", "loss", "jacobian_rel")
             if (v := result.final_metrics.get(k)) is not None}
    summary = CLTTrainResult(
        **meta, clt_config=config_to_dict(ccfg), n_parameters=ccfg.n_parameters(),
        clt_folder=str(final_path(out / CLT_DIR)) if result.ok else None, message=result.message,
        unique_tokens=data[0].unique_tokens, skip_lstsq_fve=[i.skip_fve for i in inits], final_train_metrics=final,
        train_seconds=round(result.elapsed_s, 2), total_seconds=round(time.perf_counter() - t0, 2))
    if ranks.is_main:
        write_json(out / TRAIN_JSON, summary.to_json())
    ranks.ctx.barrier()
    if not result.ok:
        raise TrainingDiverged(result.message or "training diverged")
    return summary
