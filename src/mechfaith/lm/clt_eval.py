"""``mechfaith lm eval RUN`` for a cross-layer transcoder: the CLT spliced into its model over its
whole block (:func:`~mechfaith.lm.clt_splice.splice_clt`) on held-out contexts -> ``eval.json``
(:class:`CLTEvalResult`).

One pass per batch measures the clean CE, the CE and KL with every block layer replaced, and with
the block's MLPs zero-ablated; on the clean run's inputs, per layer: FVE of the reconstruction (BOS
left out, as in training), L0 and the fraction of latents that never fired. ``l0_token`` is the
active latents per token summed over the block's layers (a CLT's and a per-layer set's are
comparable this way). A per-layer transcoder set evaluates through the same code as a reach-0 CLT
(:func:`set_block_as_clt`), so the two are measured alike.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_files import RUN_DIR, load_clt, read_clt_meta
from mechfaith.coders.validate import check_fields
from mechfaith.configs import config_from_dict
from mechfaith.errors import ConfigError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.adapters import ModelAdapter, get_adapter, hooks_removed_after
from mechfaith.lm.clt_splice import splice_clt
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.coder_set import read_set, set_coder_folders
from mechfaith.lm.config import MASSIVE_RATIO, LMConfig
from mechfaith.lm.corpus import CorpusConfig, eval_contexts
from mechfaith.lm.fidelity import kl_per_token, model_device, next_token_ce
from mechfaith.lm.model_cache import get_model
from mechfaith.lm.splice import ablate

CLT_EVAL_JSON = "eval.json"


@dataclass
class CLTLayerEval:
    """One block layer on clean inputs."""

    layer: int
    fve: float
    l0: float  # active latents of this layer per token
    dead_fraction: float  # latents of this layer that never fired on the eval tokens


@dataclass
class CLTEvalResult:
    """What :func:`evaluate_clt_on` measured (CE and KL in nats per predicted token)."""

    layers: list[int]
    eval_contexts: int
    eval_tokens: int
    keep_bos: bool
    keep_massive: float
    ce_clean: float
    ce_spliced: float
    kl_spliced: float
    ce_zero_ablated: float
    kl_zero_ablated: float
    l0_token: float  # active latents per token, summed over the block's layers
    n_parameters: int
    per_layer: list[CLTLayerEval]
    model: str = ""
    eval_source: str = ""
    seconds: float = 0.0

    @property
    def ce_increase(self) -> float:
        return self.ce_spliced - self.ce_clean

    @property
    def loss_recovered(self) -> float:
        denom = self.ce_zero_ablated - self.ce_clean
        return (self.ce_zero_ablated - self.ce_spliced) / denom if abs(denom) > 1e-12 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return json_safe({"command": "eval-clt", **dataclasses.asdict(self), "ce_increase": self.ce_increase,
                          "loss_recovered": self.loss_recovered})


def evaluate_clt_on(model: Any, clt: CrossLayerTranscoder, contexts: Tensor, *, input_site: str = "mlp_in",
                    output_site: str = "mlp_out", batch_contexts: int = 8, exclude_bos: bool = True,
                    keep_bos: bool = True, keep_massive: float = MASSIVE_RATIO, progress: bool = False) -> CLTEvalResult:
    """The measurements of the module docstring on ``contexts`` [n, seq]."""
    adapter: ModelAdapter = get_adapter(model)
    if not (adapter.has_lm_head and adapter.family.causal):
        raise ConfigError("CLT evaluation needs a causal LM with a head")
    if contexts.ndim != 2 or contexts.shape[0] == 0 or batch_contexts <= 0:
        raise ConfigError("contexts must be a non-empty [n_contexts, length] tensor and batch_contexts > 0")
    block = clt.cfg.layers
    L, n = clt.n_layers, clt.n_latents
    device = model_device(adapter)
    clt = clt.to(device).eval()
    start = 1 if exclude_bos else 0
    sums: dict[str, float] = {}
    sse = torch.zeros(L, dtype=torch.float64)
    ysum = torch.zeros(L, clt.d_out, dtype=torch.float64)
    ysq = torch.zeros(L, dtype=torch.float64)
    active = torch.zeros(L, dtype=torch.float64)
    fired = torch.zeros(L, n, dtype=torch.bool)
    rows = n_pred = 0

    def add(key: str, value: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value.double().sum())

    bar = tqdm(total=contexts.shape[0], unit="ctx", desc="CLT eval", disable=not progress, leave=False)
    with torch.inference_mode():
        for i in range(0, contexts.shape[0], batch_contexts):
            ids = contexts[i:i + batch_contexts].to(device)
            captured: dict[tuple[int, str], Tensor] = {}
            with hooks_removed_after() as handles:
                for l in block:
                    for site in (input_site, output_site):
                        handles.extend(adapter.hook_site(l, site, _store(captured, (l, site))))
                clean = adapter.logits(ids)
            x = torch.stack([captured[(l, input_site)][:, start:] for l in block]).to(clt.W_enc.dtype)
            y = torch.stack([captured[(l, output_site)][:, start:] for l in block]).to(torch.float64)
            out = clt.forward_full(x.reshape(L, -1, clt.d_in))
            yf = y.reshape(L, -1, clt.d_out)
            sse += (out.y_hat.double() - yf).pow(2).sum(dim=(1, 2)).cpu()
            ysum += yf.sum(dim=1).cpu()
            ysq += yf.pow(2).sum(dim=(1, 2)).cpu()
            active += out.mask.sum(dim=(1, 2)).double().cpu()
            fired |= out.mask.any(dim=1).cpu()
            rows += yf.shape[1]
            clean_logp = torch.log_softmax(clean.float(), dim=-1)[:, :-1]
            add("ce_clean", next_token_ce(clean, ids))
            runs: list[tuple[str, Callable[[], Any]]] = [
                ("spliced", lambda: splice_clt(adapter, clt, None, input_site, output_site, keep_bos=keep_bos,
                                               keep_massive=keep_massive)),
                ("zero", lambda: ablate(adapter, block, "zero"))]
            for key, make in runs:
                with make():
                    logits = adapter.logits(ids)
                add(f"ce/{key}", next_token_ce(logits, ids))
                add(f"kl/{key}", kl_per_token(clean_logp, logits[:, :-1]))
            n_pred += ids.shape[0] * (ids.shape[1] - 1)
            bar.update(ids.shape[0])
    bar.close()
    var = ysq - ysum.pow(2).sum(-1) / max(rows, 1)
    per_layer = [CLTLayerEval(layer=l, fve=float(1 - sse[t] / var[t].clamp_min(1e-30)),
                              l0=float(active[t] / max(rows, 1)), dead_fraction=float((~fired[t]).double().mean()))
                 for t, l in enumerate(block)]
    return CLTEvalResult(
        layers=block, eval_contexts=int(contexts.shape[0]), eval_tokens=int(contexts.numel()), keep_bos=keep_bos,
        keep_massive=keep_massive, ce_clean=sums["ce_clean"] / n_pred, ce_spliced=sums["ce/spliced"] / n_pred,
        kl_spliced=sums["kl/spliced"] / n_pred, ce_zero_ablated=sums["ce/zero"] / n_pred,
        kl_zero_ablated=sums["kl/zero"] / n_pred, l0_token=float(active.sum() / max(rows, 1)),
        n_parameters=clt.cfg.n_parameters(), per_layer=per_layer)


def _store(store: dict[tuple[int, str], Tensor], key: tuple[int, str]) -> Callable[[Tensor], None]:
    def fn(t: Tensor) -> None:
        store[key] = t
    return fn


def set_block_as_clt(folder: str | Path, layers: list[int]) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """The per-layer transcoders of a set at ``layers`` (a contiguous block) as one reach-0 CLT, and
    the set's manifest fields (model, sites). The coders must share width, activation, k and skip."""
    manifest = read_set(folder)
    folders = set_coder_folders(folder, manifest)
    missing = [l for l in layers if l not in folders]
    if missing:
        raise ConfigError(f"the set in {folder} has no coder at layers {missing}")
    refs = [open_coder(folders[l]) for l in layers]
    clt = CrossLayerTranscoder.from_coders([r.coder for r in refs], first_layer=layers[0])
    return clt, {"model": manifest.model, "input_site": manifest.input_site, "output_site": manifest.output_site,
                 "corpus": refs[0].corpus}


def evaluate_clt(path: str | Path, cfg: LMConfig | None = None, corpus_cfg: CorpusConfig | None = None, *,
                 keep_bos: bool = True, keep_massive: float = MASSIVE_RATIO, out: str | Path | None = None,
                 progress: bool = True) -> CLTEvalResult:
    """Evaluate the CLT folder (or run folder holding ``clt/``) at ``path``; write ``eval.json``
    (default: in the run folder)."""
    path = Path(path)
    folder = path / RUN_DIR if (path / RUN_DIR / "config.json").is_file() else path
    meta = read_clt_meta(folder)
    training = meta.get("training") or {}
    check_fields(folder / "config.json", training, {"model": "str|null", "input_site": "str|null",
                                                     "output_site": "str|null", "corpus": "dict|null"})
    if not training.get("model"):
        raise ConfigError(f"{folder}: the CLT does not name its model (train it with lm train --clt)")
    clt = load_clt(folder)
    cfg = dataclasses.replace(cfg or LMConfig(), model=training["model"])
    lm = get_model(cfg)
    if corpus_cfg is None:
        corpus_cfg = config_from_dict(CorpusConfig, training["corpus"]) if training.get("corpus") else CorpusConfig()
    contexts, source = eval_contexts(lm, corpus_cfg, cfg.eval_contexts)
    t0 = time.perf_counter()
    result = evaluate_clt_on(lm.adapter, clt.to(cfg.device), contexts, input_site=training.get("input_site") or "mlp_in",
                             output_site=training.get("output_site") or "mlp_out", batch_contexts=cfg.batch_contexts,
                             exclude_bos=cfg.exclude_bos, keep_bos=keep_bos, keep_massive=keep_massive,
                             progress=progress)
    result.model, result.eval_source, result.seconds = lm.name, source, round(time.perf_counter() - t0, 2)
    target = Path(out) if out is not None else (folder.parent if folder.name == RUN_DIR else folder) / CLT_EVAL_JSON
    write_json(target, result.to_json())
    return result
