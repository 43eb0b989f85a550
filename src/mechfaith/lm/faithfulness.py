"""The faithfulness report of a trained transcoder of one language-model MLP.

:func:`lm_faithfulness` collects the tensors that :func:`mechfaith.faithfulness.report.faithfulness_report`
needs from a real model, then writes ``faithfulness.json`` (the HTML page is written by
:mod:`mechfaith.reports.faithfulness_report`):

- held-out tokens: contexts from the validation documents of the coder's corpus (plays the coder
  never saw), every position kept, with groups ``bos`` (position 0) and ``other``;
- the reference: the model's own MLP as a function (:meth:`ModelAdapter.mlp_function`) between the
  coder's sites; its outputs are checked against the activations recorded in the forward pass
  (``reference_check``);
- the detector sample: the held-out contexts, optionally with a passage planted at the start of a
  share of them (:func:`plant_repeats`), and context keys (:func:`context_keys`, a hash of the
  last ``key_window`` tokens at each position) so identical contexts are recognised as such;
- off-distribution sets: ``shuffled`` (the held-out contexts with their tokens permuted inside each
  context: same words, no grammar) and, when ``offdist_source`` is given, ``other_text`` (the
  user's text files); the noise perturbations are added by the report itself.

BOS rows are excluded from everything but the ``bos`` group (their activations are atypical).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechfaith.atomic import final_path
from mechfaith.configs import check_finite, config_from_dict, config_to_dict, doc
from mechfaith.errors import ConfigError, InputError
from mechfaith.faithfulness.report import FaithfulnessConfig, faithfulness_report
from mechfaith.jsonio import json_safe, write_json
from mechfaith.lm.activations import iter_model_activations
from mechfaith.lm.adapters import ModelAdapter
from mechfaith.lm.coder_files import CODER_DIR, open_coder
from mechfaith.lm.config import LMConfig
from mechfaith.lm.corpus import CorpusConfig, eval_contexts, get_corpus, model_tokenizer
from mechfaith.lm.model_cache import get_model, resolve_layer

log = logging.getLogger(__name__)

FAITHFULNESS_JSON = "faithfulness.json"

# A public-domain passage (Lincoln, 1863) planted as the repeated input by default.
DEFAULT_PASSAGE = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. Now we "
    "are engaged in a great civil war, testing whether that nation, or any nation so conceived and "
    "so dedicated, can long endure. We are met on a great battle-field of that war. We have come to "
    "dedicate a portion of that field, as a final resting place for those who here gave their lives "
    "that that nation might live.")


@dataclass
class LMFaithfulnessConfig:
    """Which tokens the LM faithfulness report uses."""

    eval_contexts: int = doc("Held-out contexts (validation documents) for the report.", 64)
    offdist_source: str = doc("Text files / folders for the 'other_text' off-distribution set "
                              "(empty: none).", "")
    offdist_contexts: int = doc("Contexts of each off-distribution text set.", 32)
    passage: str = doc("Text planted as a repeated passage into the detector's sample: 'default' "
                       "(a fixed public-domain passage), 'none', or a path to a text file.", "none")
    passage_rate: float = doc("Share of the detector's contexts that start with the passage.", 0.05)
    key_window: int = doc("Tokens (ending at a position) whose hash is its context key.", 16)
    batch_contexts: int = doc("Contexts per forward pass.", 16)

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("eval_contexts", "offdist_contexts", "key_window", "batch_contexts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LMFaithfulnessConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.passage_rate <= 1:
            raise ConfigError(f"LMFaithfulnessConfig.passage_rate must be in [0, 1], got {self.passage_rate}")


@dataclass
class LMFaithfulnessInfo:
    """Where the report's tokens came from (the ``lm`` section of ``faithfulness.json``)."""

    model: str
    family: str
    layer: int
    input_site: str
    output_site: str
    coder: str
    eval_source: str
    eval_contexts: int
    context_length: int
    eval_tokens: int
    reference_check_rel_diff: float
    detector: dict[str, Any]  # passage, passage_tokens, planted_contexts, rows
    offdist: dict[str, Any]  # shuffled_contexts, other_text
    config: dict[str, Any]
    corpus: dict[str, Any]


@dataclass
class LMFaithfulnessResult:
    """What :func:`lm_faithfulness` wrote: the measurements of
    :func:`mechfaith.faithfulness.report.faithfulness_report` (``measures``: jacobian, spectra,
    fidelity, datapoints, offdist, masking, ...; the top level of ``faithfulness.json``), the
    ``lm`` section, the seconds taken and the file's path (not in the file)."""

    measures: dict[str, Any]
    lm: LMFaithfulnessInfo
    seconds: float
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        return json_safe({**self.measures, "lm": dataclasses.asdict(self.lm), "seconds": self.seconds})

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str = "") -> LMFaithfulnessResult:
        measures = {k: v for k, v in data.items() if k not in ("lm", "seconds")}
        return cls(measures=measures, lm=LMFaithfulnessInfo(**data["lm"]), seconds=data["seconds"], path=path)


# ---------------------------------------------------------------------- token-level helpers
def context_keys(contexts: Tensor, window: int) -> Tensor:
    """Per position, a 62-bit hash of the last ``window`` tokens ending there (fewer at the start):
    int64 [n_contexts, context_length]. Equal keys = identical recent context."""
    if contexts.ndim != 2:
        raise InputError(f"contexts must be [n, length], got {tuple(contexts.shape)}")
    rows = contexts.tolist()
    mask = (1 << 62) - 1
    out = [[hash(tuple(r[max(0, t - window + 1): t + 1])) & mask for t in range(len(r))] for r in rows]
    return torch.tensor(out, dtype=torch.long)


def plant_repeats(contexts: Tensor, passage: Tensor | list[int], rate: float, seed: int = 0,
                  ) -> tuple[Tensor, Tensor]:
    """A copy of ``contexts`` [n, L] where ``round(rate * n)`` contexts (chosen with ``seed``) have
    positions 1.. replaced by the passage's tokens (cut to L - 1; BOS at position 0 is kept).
    Returns (contexts, planted [n] bool)."""
    if not 0 <= rate <= 1:
        raise ConfigError(f"plant rate must be in [0, 1], got {rate}")
    p = torch.as_tensor(passage, dtype=torch.long).flatten()
    if p.numel() == 0:
        raise InputError("the passage has no tokens")
    n, length = contexts.shape
    out = contexts.clone()
    k = int(round(rate * n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    m = min(p.numel(), length - 1)
    out[chosen, 1:1 + m] = p[:m]
    planted = torch.zeros(n, dtype=torch.bool)
    planted[chosen] = True
    return out, planted


def shuffle_tokens(contexts: Tensor, seed: int = 0) -> Tensor:
    """The contexts with their non-BOS tokens permuted inside each context (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = contexts.clone()
    for i in range(out.shape[0]):
        out[i, 1:] = out[i, 1:][torch.randperm(out.shape[1] - 1, generator=g)]
    return out


def tokenize_text(lm: Any, text: str) -> list[int]:
    """Token ids of ``text`` in the model's tokenizer (bytes for tokenizer-less test models)."""
    tok, _ = model_tokenizer(lm)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def load_passage(spec: str) -> str | None:
    """The passage text for ``LMFaithfulnessConfig.passage``."""
    if spec in ("", "none"):
        return None
    if spec == "default":
        return DEFAULT_PASSAGE
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"{spec}: passage file not found (use 'default', 'none' or a text file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{spec}: not UTF-8 text") from None


@torch.no_grad()
def collect_inputs(adapter: ModelAdapter, contexts: Tensor, layer: int, input_site: str, output_site: str,
                   batch_contexts: int = 16, progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Every position's coder input [n*L, d_in], recorded output [n*L, d_out] and position [n*L]."""
    xs, ys = [], []
    for batch in iter_model_activations(adapter, contexts, [layer], input_site, output_site,
                                        batch_contexts, exclude_bos=False, progress=progress):
        x, y = batch[layer]
        xs.append(x.float())
        ys.append(y.float())
    pos = torch.arange(contexts.shape[1]).repeat(contexts.shape[0])
    return torch.cat(xs), torch.cat(ys), pos


# ---------------------------------------------------------------------- the report
def _offdist_sets(lm: Any, contexts: Tensor, corpus_cfg: CorpusConfig, lcfg: LMFaithfulnessConfig, layer: int,
                  in_site: str, out_site: str, seed: int, device: str,
                  ) -> tuple[dict[str, Tensor], Tensor, dict[str, Any] | None]:
    """The off-distribution inputs (``shuffled``; ``other_text`` when ``lcfg.offdist_source``), the
    shuffled contexts and a summary of the other text."""
    others: dict[str, Tensor] = {}
    shuffled = shuffle_tokens(contexts[: lcfg.offdist_contexts], seed)
    xs, _, ps = collect_inputs(lm.adapter, shuffled, layer, in_site, out_site, lcfg.batch_contexts)
    others["shuffled"] = xs[ps > 0].to(device)
    other_source = None
    if lcfg.offdist_source:
        ocfg = dataclasses.replace(corpus_cfg, source=lcfg.offdist_source, val_fraction=0.0,
                                   val_documents=[], max_documents=0)
        ocorpus = get_corpus(lm, ocfg)
        octx = ocorpus.train[: lcfg.offdist_contexts]
        xo, _, po = collect_inputs(lm.adapter, octx, layer, in_site, out_site, lcfg.batch_contexts)
        others["other_text"] = xo[po > 0].to(device)
        other_source = {"source": lcfg.offdist_source, "contexts": int(octx.shape[0]),
                        "documents": ocorpus.train_documents}
    return others, shuffled, other_source


def lm_faithfulness(coder_path: str | Path, cfg: LMConfig | None = None, corpus_cfg: CorpusConfig | None = None,
                    fcfg: FaithfulnessConfig | None = None, lcfg: LMFaithfulnessConfig | None = None, *,
                    out: str | Path | None = None, model_given: bool = False, layer_given: bool = False,
                    progress: bool = False) -> LMFaithfulnessResult:
    """The faithfulness report of the coder at ``coder_path`` (module docstring); writes
    ``faithfulness.json`` into ``out`` (default: beside the coder, in its run folder) and returns it.
    Model, layer, sites and corpus come from the coder's training metadata where it has them."""
    t0 = time.perf_counter()
    ref = open_coder(coder_path)
    cfg = cfg or LMConfig()
    fcfg = fcfg or FaithfulnessConfig()
    lcfg = lcfg or LMFaithfulnessConfig()
    model = cfg.model if (model_given or not ref.model) else ref.model
    lm = get_model(dataclasses.replace(cfg, model=model))
    adapter = lm.adapter
    layer = resolve_layer(adapter, cfg.layer) if (layer_given or ref.layer is None) else adapter.check_layer(int(ref.layer))
    in_site = ref.input_site or cfg.input_site
    out_site = ref.output_site or cfg.output_site
    if corpus_cfg is None:
        corpus_cfg = config_from_dict(CorpusConfig, ref.corpus) if ref.corpus else CorpusConfig()
    coder = ref.coder.to(cfg.device).eval()
    if coder.d_in != adapter.d_model or coder.d_out != adapter.d_model:
        raise InputError(f"the coder maps {coder.d_in} -> {coder.d_out} dimensions; {lm.name} has "
                         f"d_model {adapter.d_model}")
    reference = adapter.mlp_function(layer, in_site, out_site)
    say = (lambda s: log.info("faithfulness: %s", s))

    contexts, source = eval_contexts(lm, corpus_cfg, lcfg.eval_contexts)
    say(f"collecting {contexts.shape[0]} held-out contexts")
    x, y_rec, pos = collect_inputs(adapter, contexts, layer, in_site, out_site, lcfg.batch_contexts)
    x, y_rec = x.to(cfg.device), y_rec.to(cfg.device)
    with torch.no_grad():
        y_ref = torch.cat([reference(x[i:i + 4096]) for i in range(0, x.shape[0], 4096)])
    check = float((y_ref - y_rec).norm() / y_rec.norm().clamp_min(1e-30))
    if check > 1e-3:
        raise InputError(f"the MLP reference does not reproduce the recorded {out_site} of layer {layer} "
                         f"(relative difference {check:.2g}): the sites do not match the model")
    groups = {"bos": pos == 0, "other": pos > 0}
    typical = x[groups["other"].to(x.device)]

    # detector sample: held-out contexts with a passage planted (if any), and their keys
    passage = load_passage(lcfg.passage)
    det_contexts, planted = contexts, torch.zeros(contexts.shape[0], dtype=torch.bool)
    passage_tokens = 0
    if passage is not None:
        ids = tokenize_text(lm, passage)
        passage_tokens = min(len(ids), contexts.shape[1] - 1)
        det_contexts, planted = plant_repeats(contexts, ids, lcfg.passage_rate, seed=fcfg.seed)
    keys = context_keys(det_contexts, lcfg.key_window)[:, 1:].flatten()
    if passage is not None:
        say("collecting the detector sample (planted passage)")
        det_x = collect_inputs(adapter, det_contexts, layer, in_site, out_site, lcfg.batch_contexts)[0]
        det_x = det_x.reshape(det_contexts.shape[0], det_contexts.shape[1], -1)[:, 1:].flatten(0, 1)
    else:
        det_x = typical.cpu()
    det_x = det_x.to(cfg.device)

    say("collecting the off-distribution sets")
    others, shuffled, other_source = _offdist_sets(lm, contexts, corpus_cfg, lcfg, layer, in_site, out_site,
                                                   fcfg.seed, cfg.device)

    report = faithfulness_report(reference, coder, x, groups=groups, detector_x=det_x, detector_keys=keys,
                                 other_sets=others, typical=typical, cfg=fcfg, progress=say)
    info = LMFaithfulnessInfo(
        model=lm.name, family=adapter.family.name, layer=layer, input_site=in_site, output_site=out_site,
        coder=str(final_path(ref.folder)), eval_source=source, eval_contexts=int(contexts.shape[0]),
        context_length=int(contexts.shape[1]), eval_tokens=int(x.shape[0]), reference_check_rel_diff=check,
        detector={"passage": lcfg.passage, "passage_tokens": passage_tokens,
                  "planted_contexts": int(planted.sum()), "rows": int(det_x.shape[0])},
        offdist={"shuffled_contexts": int(shuffled.shape[0]), "other_text": other_source},
        config=config_to_dict(lcfg), corpus=config_to_dict(corpus_cfg))
    if out is None:
        out = default_faithfulness_dir(ref.folder)
    result = LMFaithfulnessResult(measures=json_safe(report), lm=info, seconds=round(time.perf_counter() - t0, 2),
                                  path=str(final_path(Path(out) / FAITHFULNESS_JSON)))
    write_json(Path(out) / FAITHFULNESS_JSON, result.to_json())
    return result


def default_faithfulness_dir(coder_folder: Path) -> Path:
    """Where a coder's report goes unless told: ``faithfulness/`` in its run folder (beside ``coder/``)
    or in its coder folder; ``NAME.faithfulness/`` beside a coder file (a GPT-2 ``.pt``)."""
    if coder_folder.name == CODER_DIR:
        return coder_folder.parent / "faithfulness"
    if coder_folder.is_file():
        return coder_folder.with_name(coder_folder.name + ".faithfulness")
    return coder_folder / "faithfulness"


def planted_rows(det_contexts_planted: Tensor, context_length: int, passage_tokens: int) -> Tensor:
    """Row indices (in the BOS-less detector sample) of the planted passage's tokens."""
    per = context_length - 1
    rows = [c * per + t for c in torch.nonzero(det_contexts_planted).flatten().tolist()
            for t in range(passage_tokens)]
    return torch.tensor(rows, dtype=torch.long)


__all__ = ["DEFAULT_PASSAGE", "FAITHFULNESS_JSON", "default_faithfulness_dir", "LMFaithfulnessConfig", "LMFaithfulnessInfo",
           "LMFaithfulnessResult", "collect_inputs", "context_keys",
           "lm_faithfulness", "plant_repeats", "planted_rows", "shuffle_tokens", "tokenize_text"]
