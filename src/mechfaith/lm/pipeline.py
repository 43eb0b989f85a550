"""The language-model pipeline: collect activations, train a coder, evaluate it spliced in.

Each step is one function that writes its artefacts and a JSON of results next to them:

- :func:`collect`: a model's (input, output) pairs of one or several layers over the training split
  of a corpus -> an activation cache folder (:mod:`mechfaith.lm.activations`) + ``collect.json``
  inside it.
- :func:`train_coder`: a transcoder (or SAE) of one layer trained by the foundation trainer
  (:class:`mechfaith.training.Trainer`) from a cache (collected first when none is given) ->
  ``OUT/coder/`` (a mechfaith coder folder whose ``training`` metadata names the model, layer and
  sites), ``OUT/metrics.jsonl``, ``OUT/checkpoint/`` and ``OUT/train.json``. Optional Jacobian
  matching against the model's own MLP (GELU for GPT-2/BERT, gated SiLU for Llama).
- :func:`evaluate`: splice the coder into the model on held-out contexts (documents the coder never
  saw) -> ``eval.json`` beside the coder folder: CE clean / spliced / zero- and mean-ablated, loss
  recovered, KL, FVE, L0 (BOS separately), dead/dense latents; for an encoder without LM head
  (MiniLM) the relative error of the final hidden states instead of CE.

The sweep over sparsity settings is in :mod:`mechfaith.lm.sweep`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import ACTIVATIONS, DECODER_NORMS, KINDS, CoderConfig
from mechfaith.coders.files import load_coder, read_json, save_coder
from mechfaith.configs import config_from_dict, config_to_dict, doc
from mechfaith.errors import CoderFileError, ConfigError, InputError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.activations import (
    INDEX_NAME,
    STORAGE_DTYPES,
    ActivationCache,
    ActivationConfig,
    CachedActivationStream,
    write_activation_cache,
)
from mechfaith.lm.adapters import FAMILIES, INPUT_SITES, ModelAdapter
from mechfaith.lm.corpus import Corpus, CorpusConfig, build_corpus
from mechfaith.lm.fidelity import FidelityConfig, evaluate_fidelity
from mechfaith.lm.models import ALIASES, BUILTINS, LoadedModel, load_model
from mechfaith.training.config import TrainConfig
from mechfaith.training.trainer import Trainer

log = logging.getLogger(__name__)

COLLECT_JSON = "collect.json"
TRAIN_JSON = "train.json"
EVAL_JSON = "eval.json"
CODER_DIR = "coder"
ACTIVATIONS_DIR = "activations"
SKIP_INITS = ("lstsq", "zero")


# ---------------------------------------------------------------------- configs
@dataclass
class LMConfig:
    """Which model, layer and activation sites; how much data; where to compute."""

    model: str = doc("Model: a built-in (smollm2-135m, minilm-l6-v2, gpt2-random, "
                     "random-gpt2/llama/bert), a local transformers folder or a hub name.",
                     "smollm2-135m")
    layer: int = doc("Layer whose MLP the coder replaces; -1: the middle layer (n_layers // 2, "
                     "15 for SmolLM2-135M).", -1)
    input_site: str = doc("Coder input: mlp_in (after the pre-MLP norm), mlp_in_normalized (norm "
                          "without its affine) or resid_pre.", "mlp_in", choices=INPUT_SITES)
    output_site: str = doc("Coder target: mlp_out or mlp_out_centered (LayerNorm models only).",
                           "mlp_out", choices=("mlp_out", "mlp_out_centered"))
    train_tokens: int = doc("Training tokens to collect (BOS positions not counted when excluded).",
                            150_000)
    eval_contexts: int = doc("Held-out contexts (from validation documents) for evaluation.", 64)
    exclude_bos: bool = doc("Leave the BOS position out of training and of the statistics (its "
                            "activations are atypical); eval reports its L0 separately.", True)
    batch_contexts: int = doc("Contexts per forward pass of the model (collection and eval).", 32)
    storage_dtype: str = doc("dtype of the activation cache on disk.", "float32",
                             choices=tuple(STORAGE_DTYPES))
    device: str = doc("Torch device for the model and the coder (cpu, cuda, ...).", "cpu")
    dtype: str = doc("dtype of the model's weights.", "float32", choices=("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        if self.layer < -1:
            raise ConfigError(f"LMConfig.layer must be >= 0 (or -1 for the middle layer), got {self.layer}")
        for name in ("train_tokens", "eval_contexts", "batch_contexts"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LMConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass
class LMCoderConfig:
    """The coder's architecture (its input and output widths come from the model)."""

    kind: str = doc("'transcoder' (MLP input -> MLP output) or 'sae' (reconstructs the input site).",
                    "transcoder", choices=KINDS)
    n_latents: int = doc("Number of latents; 0: expansion x d_in.", 0)
    expansion: int = doc("Latents per input dimension when n_latents is 0 (8 x 576 = 4608 for "
                         "SmolLM2-135M).", 8)
    activation: str = doc("Latent activation: topk, batchtopk, relu (needs --sparsity l1) or "
                          "jumprelu (needs --sparsity l0).", "topk", choices=ACTIVATIONS)
    k: int = doc("Active latents per token for topk / batchtopk.", 64)
    skip: bool = doc("Linear skip connection x W_skip (transcoders): lifts FVE by about 0.1.", True)
    skip_init: str = doc("Initial W_skip and b_dec: lstsq (least-squares fit of the target from "
                         "the input on the first cached rows; the latents then learn the rest) or "
                         "zero.", "lstsq", choices=SKIP_INITS)
    decoder_norm: str = doc("'unit' (decoder rows kept at unit norm) or 'penalty'.", "unit",
                            choices=DECODER_NORMS)
    jumprelu_threshold: float = doc("Initial JumpReLU threshold.", 1e-3)
    jumprelu_bandwidth: float = doc("JumpReLU straight-through kernel width.", 1e-3)
    latent_init_fraction: float = doc("Initial RMS of the latents' contribution as a fraction of what the "
                                      "skip and bias leave unexplained (0: no rescaling of the encoder).",
                                      0.3)
    center_encoder: bool = doc("Initialise b_enc = -mean(x) W_enc (the encoder sees centred inputs; "
                               "fewer dead latents).", True)
    init_seed: int = doc("Seed of the coder's random initialisation.", 0)

    def __post_init__(self) -> None:
        if self.n_latents < 0 or self.expansion <= 0:
            raise ConfigError("LMCoderConfig: n_latents must be >= 0 and expansion positive")
        if self.latent_init_fraction < 0:
            raise ConfigError("LMCoderConfig.latent_init_fraction must be >= 0")

    def coder_config(self, d_in: int, d_out: int) -> CoderConfig:
        n = self.n_latents or self.expansion * d_in
        return CoderConfig(d_in=d_in, n_latents=n, d_out=d_out if self.kind == "transcoder" else d_in,
                           kind=self.kind, activation=self.activation, k=min(self.k, n),
                           jumprelu_threshold=self.jumprelu_threshold,
                           jumprelu_bandwidth=self.jumprelu_bandwidth,
                           skip=self.skip and self.kind == "transcoder", decoder_norm=self.decoder_norm,
                           # unit rows: the LM defaults (latent_init_fraction, lr) were tuned with them
                           init_scale=1.0)


# Defaults of the training options for LM coders, on top of TrainConfig's own (the CLI applies
# them below the config file and the flags).
LM_TRAIN_DEFAULTS: dict[str, Any] = {
    "n_steps": 300, "batch_size": 1024, "lr": 5e-4, "lr_warmup_steps": 20, "sparsity": "none",
    "log_every": 25, "checkpoint_every": 100, "dead_window": 50_000,
}


def lm_train_config(**overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` with :data:`LM_TRAIN_DEFAULTS` (and ``overrides``) applied."""
    return config_from_dict(TrainConfig, {**LM_TRAIN_DEFAULTS, **overrides})


# ---------------------------------------------------------------------- models and corpora
_MODELS: dict[tuple[str, str, str], LoadedModel] = {}


def _hub_reachable() -> bool:
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False


def check_model_name(name: str) -> None:
    """Fail fast (one line) for a name that is no built-in, no local folder, not in the Hugging Face
    cache, while the hub cannot be reached (instead of a minute of download retries)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in BUILTINS or (key.startswith("random-") and key[len("random-"):] in FAMILIES):
        return
    if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return
    try:
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # an invalid repo id, or no huggingface_hub: let the loader report it
        pass
    if not _hub_reachable():
        raise InputError(f"unknown model {name!r}: not a built-in ({', '.join(BUILTINS)}, "
                         f"random-gpt2/llama/bert), not a local folder, and the Hugging Face hub "
                         f"is unreachable")


def get_model(cfg: LMConfig) -> LoadedModel:
    """Load ``cfg.model`` (kept in memory for later calls in this process)."""
    key = (cfg.model, cfg.device, cfg.dtype)
    if key not in _MODELS:
        check_model_name(cfg.model)
        t0 = time.perf_counter()
        _MODELS[key] = load_model(cfg.model, cfg.device, cfg.dtype)
        log.info("loaded %s in %.1f s", cfg.model, time.perf_counter() - t0)
    return _MODELS[key]


def resolve_layer(adapter: ModelAdapter, layer: int) -> int:
    """``layer``, or the middle layer for -1; a one-line error when out of range."""
    if layer == -1:
        return adapter.n_layers // 2
    return adapter.check_layer(int(layer))


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


def get_corpus(lm: LoadedModel, corpus_cfg: CorpusConfig) -> Corpus:
    """The corpus in the model's tokens (bytes for models without a tokenizer)."""
    tokenizer = lm.tokenizer
    bos = lm.bos_token_id
    if tokenizer is None:
        bos = 0 if bos is None else bos
        tokenizer = ByteTokenizer(int(lm.model.config.vocab_size), bos)
    return build_corpus(corpus_cfg, tokenizer, bos)


def _check_sites(adapter: ModelAdapter, cfg: LMConfig) -> None:
    if cfg.output_site == "mlp_out_centered" and adapter.family.norm_kind != "layernorm":
        raise ConfigError(f"output_site mlp_out_centered needs a LayerNorm model; {adapter.family.name} "
                          f"uses {adapter.family.norm_kind} (use mlp_out)")


# ---------------------------------------------------------------------- collect
def collect(cfg: LMConfig, corpus_cfg: CorpusConfig, folder: str | Path, *,
            layers: list[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Collect ``layers`` (default: ``cfg.layer``) in one pass over about ``cfg.train_tokens``
    training tokens into ``folder``; returns (and writes as ``collect.json`` inside it) the summary."""
    folder = Path(folder)
    lm = get_model(cfg)
    adapter = lm.adapter
    _check_sites(adapter, cfg)
    layers = [resolve_layer(adapter, l) for l in (layers or [cfg.layer])]
    corpus = get_corpus(lm, corpus_cfg)
    per_context = corpus_cfg.context_length - (1 if cfg.exclude_bos else 0)
    n_contexts = math.ceil(cfg.train_tokens / per_context)
    available = int(corpus.train.shape[0])
    if n_contexts > available:
        log.warning("the corpus has only %d training contexts (%d tokens); collecting all of them",
                    available, available * per_context)
        n_contexts = available
    act_cfg = ActivationConfig(layers=layers, input_site=cfg.input_site, output_site=cfg.output_site,
                               batch_contexts=cfg.batch_contexts, exclude_bos=cfg.exclude_bos,
                               storage_dtype=cfg.storage_dtype, seed=corpus_cfg.seed)
    extra = {"lm": config_to_dict(cfg), "corpus": config_to_dict(corpus_cfg)}
    t0 = time.perf_counter()
    write_activation_cache(adapter, corpus.train[:n_contexts], act_cfg, folder, model_name=lm.name,
                           progress=progress, extra=extra)
    seconds = time.perf_counter() - t0
    cache = ActivationCache(folder)
    summary = {
        "command": "collect", "model": lm.name, "family": adapter.family.name,
        "n_layers": adapter.n_layers, "layers": layers, "input_site": cfg.input_site,
        "output_site": cfg.output_site, "d_in": cache.d_in, "d_out": cache.d_out,
        "n_contexts": n_contexts, "context_length": corpus_cfg.context_length,
        "n_tokens": cache.n_tokens, "exclude_bos": cfg.exclude_bos, "seconds": round(seconds, 2),
        "tokens_per_second": round(n_contexts * corpus_cfg.context_length / seconds, 1),
        "train_documents": len(corpus.train_documents), "val_documents": corpus.val_documents,
        "folder": str(folder),
    }
    write_json(folder / COLLECT_JSON, json_safe(summary))
    return summary


def _cache_matches(folder: Path, lm_name: str, layer: int, cfg: LMConfig, corpus_cfg: CorpusConfig) -> bool:
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


# ---------------------------------------------------------------------- train
class ColumnStream:
    """A cached stream served as ``(x, y)`` (transcoder), ``(x, None)`` (SAE of the input) or
    ``(y, None)`` (SAE of the output); resumable through the cached stream's state."""

    def __init__(self, stream: CachedActivationStream, mode: str = "xy") -> None:
        if mode not in ("xy", "x", "y"):
            raise ConfigError(f"ColumnStream mode must be xy, x or y, not {mode!r}")
        self.stream, self.mode = stream, mode

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        x, y = self.stream.next_batch()
        if self.mode == "xy":
            return x, y
        return (x if self.mode == "x" else y), None

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


@torch.no_grad()
def init_skip_lstsq(coder: SparseCoder, x: Tensor, y: Tensor, ridge: float = 1e-4) -> float:
    """Set ``W_skip`` and ``b_dec`` to the ridge least-squares fit of ``y`` from ``x`` (float64);
    returns the fraction of variance that linear map explains on these rows."""
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xc.T @ yc)  # [d_in, d_out]
    b = my - mx @ w
    coder.W_skip.copy_(w.to(coder.W_skip.dtype))
    coder.b_dec.copy_(b.to(coder.b_dec.dtype))
    resid = yc - xc @ w
    return float(1.0 - resid.pow(2).sum() / yc.pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def scale_encoder_(coder: SparseCoder, x: Tensor, y: Tensor, fraction: float = 0.1) -> float:
    """Scale ``W_enc`` and ``b_enc`` so that the latents' initial contribution ``f W_dec`` has ``fraction`` of the
    RMS of what is left to explain (``y`` minus the skip and bias part); ReLU and TopK latents are
    positively homogeneous, so this starts training near the linear fit instead of far from it.
    Returns the scale applied."""
    if coder.cfg.activation == "jumprelu":
        return 1.0
    xin = x.to(coder.W_enc.dtype)
    out = coder.forward_full(xin)
    part = out.f @ coder.W_dec  # [rows, d_out]
    rest = y.to(part.dtype) - (out.y_hat - part)
    rms_part = float(part.pow(2).mean().sqrt())
    rms_rest = float(rest.pow(2).mean().sqrt())
    if rms_part <= 0 or rms_rest <= 0:
        return 1.0
    scale = fraction * rms_rest / rms_part
    coder.W_enc.mul_(scale)
    coder.b_enc.mul_(scale)  # pre = x W_enc + b_enc scales as a whole
    return scale


@torch.no_grad()
def center_encoder_(coder: SparseCoder, x: Tensor) -> None:
    """``b_enc = -mean(x) W_enc``: pre-activations of the centred input, so that the input's large
    mean (shared by every token) does not make the same latents win TopK on every token."""
    coder.b_enc.copy_(-(x.to(coder.W_enc.dtype).mean(0) @ coder.W_enc))


def _coder_dir(run: Path) -> Path:
    return run / CODER_DIR


def train_coder(cfg: LMConfig, corpus_cfg: CorpusConfig, coder_cfg: LMCoderConfig, train_cfg: TrainConfig,
                out: str | Path, *, activations: str | Path | None = None, sae_site: str = "input",
                resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train one coder of ``cfg.layer`` and write ``out/coder``, ``out/train.json`` and the log.

    ``activations``: an existing cache folder (else one is collected into ``out/activations``, or
    reused from there when it was collected with the same settings). ``sae_site``: for an SAE,
    whether it reconstructs the cached ``input`` or ``output`` site.
    """
    out = Path(out)
    t_start = time.perf_counter()
    collect_seconds = 0.0
    if activations is None:
        lm = get_model(cfg)
        layer = resolve_layer(lm.adapter, cfg.layer)
        folder = out / ACTIVATIONS_DIR
        if _cache_matches(folder, lm.name, layer, cfg, corpus_cfg):
            log.info("reusing the activation cache in %s", folder)
        else:
            collect_seconds = collect(cfg, corpus_cfg, folder, layers=[layer], progress=progress)["seconds"]
    else:
        folder = Path(activations)
    cache = ActivationCache(folder)
    model_name = str(cache.index.get("model", cfg.model))
    if activations is not None:
        layer = cache.layers[0] if cfg.layer == -1 and len(cache.layers) == 1 else None
        if layer is None:
            layer = resolve_layer(get_model(cfg).adapter, cfg.layer) if cfg.layer == -1 else cfg.layer
        cache.shards(layer)  # a one-line error when the cache lacks the layer
        cfg = dataclasses.replace(cfg, input_site=cache.index["input_site"],
                                  output_site=cache.index["output_site"])
    if sae_site not in ("input", "output"):
        raise ConfigError(f"sae_site must be 'input' or 'output', not {sae_site!r}")
    if coder_cfg.kind == "sae":
        d = cache.d_in if sae_site == "input" else cache.d_out
        ccfg = coder_cfg.coder_config(d, d)
        mode = "x" if sae_site == "input" else "y"
        in_site = cfg.input_site if sae_site == "input" else cfg.output_site
        out_site = in_site
    else:
        ccfg = coder_cfg.coder_config(cache.d_in, cache.d_out)
        mode, in_site, out_site = "xy", cfg.input_site, cfg.output_site
    if ccfg.activation == "relu" and train_cfg.sparsity == "none":
        raise ConfigError("a ReLU coder needs a sparsity penalty: add --sparsity l1 (and a --sparsity-coef)")
    if ccfg.activation == "jumprelu" and train_cfg.sparsity != "l0":
        raise ConfigError("a JumpReLU coder is trained with --sparsity l0")
    reference = None
    if train_cfg.jacobian_coef > 0:
        if ccfg.kind != "transcoder":
            raise ConfigError("Jacobian matching needs a transcoder (an SAE has no MLP to match)")
        lm = get_model(dataclasses.replace(cfg, model=model_name))
        reference = lm.adapter.mlp_function(layer, cfg.input_site, cfg.output_site)
    train_cfg = dataclasses.replace(train_cfg, device=cfg.device)

    coder = SparseCoder(ccfg, generator=torch.Generator().manual_seed(coder_cfg.init_seed))
    skip_fve = None
    first_x, first_y = cache.read_shard(layer, 0)
    if ccfg.kind == "transcoder" and ccfg.skip and coder_cfg.skip_init == "lstsq":
        skip_fve = init_skip_lstsq(coder, first_x[:65536], first_y[:65536])
        log.info("least-squares skip initialisation explains %.3f of the variance", skip_fve)
    else:
        target = first_x if (ccfg.kind == "sae" and mode == "x") else first_y
        with torch.no_grad():
            coder.b_dec.copy_(target[:65536].mean(0))
    sample_x = first_x[:8192] if mode != "y" else first_y[:8192]
    sample_y = first_y[:8192] if mode == "xy" else sample_x
    if coder_cfg.center_encoder:
        center_encoder_(coder, sample_x)
    if coder_cfg.latent_init_fraction > 0:
        scale_encoder_(coder, sample_x, sample_y, coder_cfg.latent_init_fraction)
    stream = ColumnStream(CachedActivationStream(cache, layer, train_cfg.batch_size, seed=train_cfg.seed,
                                                 device=cfg.device), mode)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(coder, train_cfg, reference, log_path=out / "metrics.jsonl",
                      checkpoint_dir=out / "checkpoint", progress=progress, desc=f"train L{layer}")
    result = trainer.fit(stream, resume=resume)
    coder.eval()
    meta = {
        "source": "mechfaith lm train", "model": model_name, "layer": layer, "input_site": in_site,
        "output_site": out_site, "activations": str(folder), "corpus": cache.index.get("extra", {}).get("corpus"),
        "train_config": config_to_dict(train_cfg), "lm_coder_config": config_to_dict(coder_cfg),
        "steps": result.steps_done, "tokens": result.tokens_seen, "status": result.status,
    }
    if result.ok:
        save_coder(coder, _coder_dir(out), training=json_safe(meta))
    final = {k: result.final_metrics.get(k) for k in ("fve", "mse", "l0", "dead_frac", "loss", "jacobian_rel")
             if result.final_metrics.get(k) is not None}
    summary = {
        "command": "train", **meta, "coder_config": config_to_dict(ccfg),
        "coder_folder": str(_coder_dir(out)) if result.ok else None,
        "message": result.message, "unique_tokens": cache.n_tokens,
        "epochs": result.tokens_seen / max(cache.n_tokens, 1), "skip_lstsq_fve": skip_fve,
        "final_train_metrics": final, "train_seconds": round(result.elapsed_s, 2),
        "collect_seconds": collect_seconds, "total_seconds": round(time.perf_counter() - t_start, 2),
    }
    write_json(out / TRAIN_JSON, json_safe(summary))
    if not result.ok:
        from mechfaith.errors import TrainingDiverged
        raise TrainingDiverged(result.message or "training diverged")
    return summary


# ---------------------------------------------------------------------- eval
@dataclass
class CoderRef:
    """A coder to evaluate with where it sits in the model."""

    coder: SparseCoder
    model: str | None
    layer: int | None
    input_site: str | None
    output_site: str | None
    corpus: dict[str, Any] | None
    folder: Path


def open_coder(path: str | Path) -> CoderRef:
    """A mechfaith coder folder (a run folder holding ``coder/`` works too) or a SAELens folder."""
    path = Path(path)
    if path.is_dir() and (path / CODER_DIR).is_dir() and not (path / "config.json").is_file():
        path = path / CODER_DIR
    if path.is_dir() and (path / "cfg.json").is_file() and not (path / "config.json").is_file():
        from mechfaith.lm.formats import import_saelens
        imp = import_saelens(path)
        model = imp.source.get("metadata", {}).get("model_name") if isinstance(imp.source, dict) else None
        return CoderRef(imp.coder, model or None, imp.layer, imp.input_site, imp.output_site, None, path)
    if path.is_file() and path.suffix == ".pt":
        from mechfaith.lm.formats import import_gpt2_transcoder
        imp = import_gpt2_transcoder(path)
        return CoderRef(imp.coder, None, imp.layer, imp.input_site, imp.output_site, None, path)
    coder = load_coder(path)
    folder = path if path.is_dir() else path.parent
    meta = read_json(folder / "config.json").get("training", {}) or {}
    return CoderRef(coder.eval(), meta.get("model"), meta.get("layer"), meta.get("input_site"),
                    meta.get("output_site"), meta.get("corpus"), folder)


def default_eval_path(ref: CoderRef) -> Path:
    """``eval.json`` beside the coder folder (in its run folder)."""
    folder = ref.folder
    if folder.name == CODER_DIR:
        return folder.parent / EVAL_JSON
    return folder.with_name(folder.name + ".eval.json")


def eval_contexts(lm: LoadedModel, corpus_cfg: CorpusConfig, n: int) -> tuple[Tensor, str]:
    """Up to ``n`` held-out contexts (validation documents; the last training contexts if there
    are none) and where they came from."""
    corpus = get_corpus(lm, corpus_cfg)
    if corpus.val.shape[0] > 0:
        return corpus.val[:n], f"validation documents {', '.join(corpus.val_documents)}"
    log.warning("the corpus has no validation documents; evaluating on the last training contexts")
    return corpus.train[-n:], "the last training contexts (no validation documents)"


def evaluate(coder_path: str | Path, cfg: LMConfig | None = None, corpus_cfg: CorpusConfig | None = None,
             *, out: str | Path | None = None, keep_bos: bool = False, model_given: bool = False,
             layer_given: bool = False, progress: bool = True) -> dict[str, Any]:
    """Splice the coder at ``coder_path`` into its model on held-out contexts; write ``eval.json``.

    The model, layer, sites and corpus come from the coder's training metadata; ``cfg`` supplies
    them where the metadata has none (or overrides model / layer when ``model_given`` /
    ``layer_given``).
    """
    ref = open_coder(coder_path)
    cfg = cfg or LMConfig()
    model = cfg.model if (model_given or not ref.model) else ref.model
    lm_cfg = dataclasses.replace(cfg, model=model)
    lm = get_model(lm_cfg)
    adapter = lm.adapter
    if layer_given or ref.layer is None:
        layer = resolve_layer(adapter, cfg.layer)
    else:
        layer = adapter.check_layer(int(ref.layer))
    in_site = ref.input_site or cfg.input_site
    out_site = ref.output_site or cfg.output_site
    if corpus_cfg is None:
        corpus_cfg = config_from_dict(CorpusConfig, ref.corpus) if ref.corpus else CorpusConfig()
    d_model = adapter.d_model
    if ref.coder.d_in != d_model or ref.coder.d_out != d_model:
        raise InputError(f"the coder maps {ref.coder.d_in} -> {ref.coder.d_out} dimensions; "
                         f"{lm.name} has d_model {d_model}")
    contexts, source = eval_contexts(lm, corpus_cfg, cfg.eval_contexts)
    coder = ref.coder.to(cfg.device)
    fcfg = FidelityConfig(batch_contexts=cfg.batch_contexts, exclude_bos=cfg.exclude_bos, keep_bos=keep_bos)
    t0 = time.perf_counter()
    report = evaluate_fidelity(adapter, contexts, {layer: coder}, in_site, out_site, fcfg, progress=progress)
    seconds = time.perf_counter() - t0
    stats = report.layer_stats[0]
    result = {
        "command": "eval", "model": lm.name, "family": adapter.family.name, "layer": layer,
        "input_site": in_site, "output_site": out_site, "coder": str(ref.folder),
        "coder_kind": coder.cfg.kind, "activation": coder.cfg.activation, "n_latents": coder.n_latents,
        "eval_contexts": int(contexts.shape[0]), "eval_tokens": report.n_tokens, "eval_source": source,
        "has_lm_head": adapter.has_lm_head and adapter.family.causal,
        "fve": stats.fve, "mse": stats.mse, "l0": stats.l0, "l0_bos": stats.l0_bos,
        "dead_fraction": stats.dead_fraction, "dense_fraction": stats.dense_fraction,
        "ce_clean": report.ce_clean, "ce_spliced": report.ce_spliced,
        "ce_zero_ablated": report.ce_zero_ablated, "ce_mean_ablated": report.ce_mean_ablated,
        "ce_increase": report.ce_increase, "loss_recovered_zero": report.loss_recovered_zero,
        "loss_recovered_mean": report.loss_recovered_mean, "kl_spliced": report.kl_spliced,
        "kl_zero_ablated": report.kl_zero_ablated, "kl_mean_ablated": report.kl_mean_ablated,
        "hidden_rel_error_spliced": report.hidden_rel_error_spliced,
        "hidden_rel_error_zero_ablated": report.hidden_rel_error_zero_ablated,
        "keep_bos": keep_bos, "seconds": round(seconds, 2), "report": report.to_dict(),
    }
    path = Path(out) if out is not None else default_eval_path(ref)
    write_json(path, json_safe(result))
    result["path"] = str(path)
    return result


def coder_corpus_with_source(coder_path: str | Path, source: str | None) -> CorpusConfig | None:
    """The corpus a coder was trained on, with its text source replaced by ``source`` (None: keep
    the coder's own corpus, returned as None so callers use the recorded one)."""
    if not source:
        return None
    data = dict(open_coder(coder_path).corpus or {})
    data["source"] = source
    return config_from_dict(CorpusConfig, data)

