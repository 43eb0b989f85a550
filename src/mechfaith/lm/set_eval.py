"""``mechfaith lm eval SET``: a replacement set spliced into its model all at once -> ``SET/eval.json``
(:class:`SetEvalResult`).

On held-out contexts (documents the coders never saw), one pass over the contexts measures: the
clean CE; the CE with every layer of the set replaced, with all but the first and the last, with
each layer alone, and with every prefix of the set's layers replaced (the cumulative splice: layers
``l_0 .. l_i``); the CE with all the set's MLPs zero-ablated (the baseline a replacement must beat);
the KL divergence to the clean model for each; and per layer FVE, L0 (BOS separately), dead and
dense fractions of the coders on clean inputs (:func:`~mechfaith.lm.fidelity.evaluate_many`).

BOS: by default (``keep_bos=True``) every layer keeps the model's own MLP output at the BOS position.
The set's coders are trained with BOS left out (its activations are atypical, with norms hundreds of
times the others'), and BOS is the attention sink every later position reads: a coder's error there
would reach every token of the context through every later layer. ``keep_bos=False`` replaces BOS
too (``lm eval SET --splice-bos``). Likewise, by default, every position whose own MLP output norm is
more than ``keep_massive`` (50) times the median of the batch keeps it: the attention sinks with
"massive activations" that a set streamed from the model is trained without (``LMConfig.massive_ratio``;
in SmolLM2-135M the first token of some contexts, with norms near 25,000 at layer 11 against a
median of 30). ``keep_massive=0`` (``--keep-massive 0``) replaces them too.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechfaith.configs import config_from_dict
from mechfaith.errors import ConfigError
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.coder_files import open_coder
from mechfaith.lm.coder_set import read_set, set_coder_folders
from mechfaith.lm.config import MASSIVE_RATIO, LMConfig
from mechfaith.lm.corpus import CorpusConfig, eval_contexts
from mechfaith.lm.fidelity import FidelityConfig, SpliceEntry, evaluate_many, group_key
from mechfaith.lm.model_cache import get_model

SET_EVAL_JSON = "eval.json"
# Held-out contexts ``lm eval SET`` uses unless told: a set of L layers costs about 2 L + 3 forward
# passes per batch (each layer alone, every prefix), 63 for SmolLM2's 30 layers.
SET_EVAL_CONTEXTS = 16
# Attention sinks keep the model's own MLP output, as BOS does (the set was trained without them).
DEFAULT_KEEP_MASSIVE = MASSIVE_RATIO


@dataclass
class SetLayerEval:
    """One layer of the set: its coder on clean inputs, and the model with it (or its prefix) spliced."""

    layer: int
    fve: float
    mse: float
    l0: float | None
    l0_bos: float | None
    dead_fraction: float | None
    dense_fraction: float | None
    ce_alone: float | None  # only this layer replaced
    kl_alone: float | None
    ce_prefix: float | None  # this layer and every earlier layer of the set replaced
    kl_prefix: float | None


@dataclass
class SetEvalResult:
    """What :func:`evaluate_set` measured (``SET/eval.json``; CE in nats per predicted token)."""

    model: str
    layers: list[int]
    eval_contexts: int
    eval_tokens: int
    eval_source: str
    keep_bos: bool
    keep_massive: float  # positions whose MLP output norm exceeds this multiple of the median keep it (0: none)
    ce_clean: float
    ce_all: float
    kl_all: float
    ce_all_but_first_last: float | None  # None for sets of fewer than three layers
    kl_all_but_first_last: float | None
    ce_zero_ablated: float  # every MLP of the set zero-ablated
    kl_zero_ablated: float
    per_layer: list[SetLayerEval]
    seconds: float

    @property
    def ce_increase(self) -> float:
        return self.ce_all - self.ce_clean

    def to_json(self) -> dict[str, Any]:
        return json_safe({"command": "eval-set", **dataclasses.asdict(self), "ce_increase": self.ce_increase})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SetEvalResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"per_layer"}
        data = {"keep_massive": 0.0, **data}  # eval.json files written before the option
        return cls(**{k: data[k] for k in names}, per_layer=[SetLayerEval(**p) for p in data["per_layer"]])


def evaluate_set(folder: str | Path, cfg: LMConfig | None = None, corpus_cfg: CorpusConfig | None = None, *,
                 keep_bos: bool = True, keep_massive: float = DEFAULT_KEEP_MASSIVE, out: str | Path | None = None,
                 progress: bool = True) -> SetEvalResult:
    """Splice the set in ``folder`` (module docstring); write ``eval.json`` (default: in the set)."""
    folder = Path(folder)
    manifest = read_set(folder)
    if not manifest.model:
        raise ConfigError(f"{folder}: the set does not name its model (a sparsify run names it in its "
                          f"config.json, as sparsify's command line writes it)")
    refs = {l: open_coder(path) for l, path in set_coder_folders(folder, manifest).items()}
    cfg = dataclasses.replace(cfg or LMConfig(), model=manifest.model)
    lm = get_model(cfg)
    if not (lm.adapter.has_lm_head and lm.adapter.family.causal):
        raise ConfigError(f"{lm.name} is not a causal LM with a head: all-layer CE needs one")
    if corpus_cfg is None:
        first = next(iter(refs.values()))
        corpus_cfg = config_from_dict(CorpusConfig, first.corpus) if first.corpus else CorpusConfig()
    layers = sorted(refs)
    entries = {l: SpliceEntry(refs[l].coder.to(cfg.device), l, str(refs[l].input_site or manifest.input_site),
                              str(refs[l].output_site or manifest.output_site)) for l in layers}
    named: dict[str, list[SpliceEntry]] = {"all": [entries[l] for l in layers]}
    if len(layers) >= 3:
        named["all_but_first_last"] = [entries[l] for l in layers[1:-1]]
    for i, l in enumerate(layers):
        named[f"alone/{l}"] = [entries[l]]
        if 0 < i < len(layers) - 1:  # the first prefix is the layer alone, the last one is "all"
            named[f"prefix/{l}"] = [entries[m] for m in layers[:i + 1]]
    contexts, source = eval_contexts(lm, corpus_cfg, cfg.eval_contexts)
    fcfg = FidelityConfig(batch_contexts=cfg.batch_contexts, exclude_bos=cfg.exclude_bos, keep_bos=keep_bos,
                          keep_massive=keep_massive)
    t0 = time.perf_counter()
    many = evaluate_many(lm.adapter, contexts, named, fcfg, progress=progress, desc="set eval",
                         ablations=[layers])
    got, base = many.coders, many.baseline
    assert base.ce_clean is not None and base.ce_zero_ablated is not None and base.kl_zero_ablated is not None

    def ce_kl(name: str) -> tuple[float | None, float | None]:
        return (got[name].ce_spliced, got[name].kl_spliced) if name in got else (None, None)

    per_layer = []
    for i, (l, st) in enumerate(zip(layers, got["all"].layer_stats)):
        prefix = "all" if i == len(layers) - 1 else (f"alone/{l}" if i == 0 else f"prefix/{l}")
        (ce_a, kl_a), (ce_p, kl_p) = ce_kl(f"alone/{l}"), ce_kl(prefix)
        per_layer.append(SetLayerEval(layer=l, fve=st.fve, mse=st.mse, l0=st.l0, l0_bos=st.l0_bos,
                                      dead_fraction=st.dead_fraction, dense_fraction=st.dense_fraction,
                                      ce_alone=ce_a, kl_alone=kl_a, ce_prefix=ce_p, kl_prefix=kl_p))
    ce_abf, kl_abf = ce_kl("all_but_first_last")
    all_ce, all_kl = ce_kl("all")
    assert all_ce is not None and all_kl is not None
    result = SetEvalResult(
        model=lm.name, layers=layers, eval_contexts=int(contexts.shape[0]), eval_tokens=base.n_tokens,
        eval_source=source, keep_bos=keep_bos, keep_massive=keep_massive, ce_clean=base.ce_clean, ce_all=all_ce, kl_all=all_kl,
        ce_all_but_first_last=ce_abf, kl_all_but_first_last=kl_abf,
        ce_zero_ablated=base.ce_zero_ablated[group_key(layers)], kl_zero_ablated=base.kl_zero_ablated[group_key(layers)],
        per_layer=per_layer, seconds=round(time.perf_counter() - t0, 2))
    write_json(Path(out) if out is not None else folder / SET_EVAL_JSON, result.to_json())
    return result
