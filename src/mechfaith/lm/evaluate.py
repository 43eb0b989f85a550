"""``mechfaith lm eval``: splice a coder into its model on held-out contexts (documents the coder
never saw) -> ``eval.json`` beside the coder folder (:class:`EvalResult`): CE clean / spliced /
zero- and mean-ablated, loss recovered, KL, FVE, L0 (BOS separately), dead/dense latents; for an
encoder without LM head (MiniLM) the relative error of the final hidden states instead of CE.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechfaith.atomic import final_path
from mechfaith.configs import config_from_dict
from mechfaith.errors import InputError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.coder_files import default_eval_path, open_coder
from mechfaith.lm.config import LMConfig
from mechfaith.lm.corpus import CorpusConfig, eval_contexts
from mechfaith.lm.fidelity import FidelityConfig, FidelityReport, evaluate_fidelity
from mechfaith.lm.model_cache import get_model, resolve_layer


@dataclass
class EvalResult:
    """What :func:`evaluate` measured (``eval.json``, which has every field but ``path``)."""

    model: str
    family: str
    layer: int
    input_site: str
    output_site: str
    coder: str
    coder_kind: str
    activation: str
    n_latents: int
    eval_contexts: int
    eval_tokens: int
    eval_source: str
    has_lm_head: bool
    fve: float | None
    mse: float | None
    l0: float | None
    l0_bos: float | None
    dead_fraction: float | None
    dense_fraction: float | None
    ce_clean: float | None
    ce_spliced: float | None
    ce_zero_ablated: float | None
    ce_mean_ablated: float | None
    ce_increase: float | None
    loss_recovered_zero: float | None
    loss_recovered_mean: float | None
    kl_spliced: float | None
    kl_zero_ablated: float | None
    kl_mean_ablated: float | None
    hidden_rel_error_spliced: float | None
    hidden_rel_error_zero_ablated: float | None
    keep_bos: bool
    seconds: float
    report: FidelityReport
    path: str | None = None  # where it was written

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("path", "report")}
        return json_safe({"command": "eval", **data, "report": self.report.to_dict()})

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str | None = None) -> EvalResult:
        values: dict[str, Any] = {f.name: data.get(f.name) for f in dataclasses.fields(cls)
                                  if f.name not in ("path", "report")}
        return cls(**values, report=FidelityReport.from_dict(data["report"]), path=path)


def evaluate(coder_path: str | Path, cfg: LMConfig | None = None, corpus_cfg: CorpusConfig | None = None,
             *, out: str | Path | None = None, keep_bos: bool = False, model_given: bool = False,
             layer_given: bool = False, progress: bool = True) -> EvalResult:
    """Splice the coder at ``coder_path`` into its model on held-out contexts; write ``eval.json``.

    The model, layer, sites and corpus come from the coder's training metadata; ``cfg`` supplies
    them where the metadata has none (or overrides model / layer when ``model_given`` /
    ``layer_given``).
    """
    ref = open_coder(coder_path)
    cfg = cfg or LMConfig()
    model = cfg.model if (model_given or not ref.model) else ref.model
    lm = get_model(dataclasses.replace(cfg, model=model))
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
    result = EvalResult(
        model=lm.name, family=adapter.family.name, layer=layer, input_site=in_site, output_site=out_site,
        coder=str(final_path(ref.folder)), coder_kind=coder.cfg.kind, activation=coder.cfg.activation,
        n_latents=coder.n_latents, eval_contexts=int(contexts.shape[0]), eval_tokens=report.n_tokens,
        eval_source=source, has_lm_head=adapter.has_lm_head and adapter.family.causal,
        fve=stats.fve, mse=stats.mse, l0=stats.l0, l0_bos=stats.l0_bos, dead_fraction=stats.dead_fraction,
        dense_fraction=stats.dense_fraction, ce_clean=report.ce_clean, ce_spliced=report.ce_spliced,
        ce_zero_ablated=report.ce_zero_ablated, ce_mean_ablated=report.ce_mean_ablated,
        ce_increase=report.ce_increase, loss_recovered_zero=report.loss_recovered_zero,
        loss_recovered_mean=report.loss_recovered_mean, kl_spliced=report.kl_spliced,
        kl_zero_ablated=report.kl_zero_ablated, kl_mean_ablated=report.kl_mean_ablated,
        hidden_rel_error_spliced=report.hidden_rel_error_spliced,
        hidden_rel_error_zero_ablated=report.hidden_rel_error_zero_ablated,
        keep_bos=keep_bos, seconds=round(seconds, 2), report=report)
    path = Path(out) if out is not None else default_eval_path(ref)
    write_json(path, result.to_json())
    result.path = str(final_path(path))
    return result
