"""What a feature dashboard shows, computed from a model, its transcoders and a set of contexts.

For each requested feature ``(layer, index)``: its activation density over the contexts' tokens (BOS
excluded), a histogram of its nonzero activations, examples grouped into activation bands (fractions
of its maximum) with every token's activation for shading, the top de-embedding tokens, the top and
bottom logit effects, and the top pullbacks from the previous transcoder layer. The result is plain
JSON-safe dicts (rendered by :mod:`mechfaith.reports.dashboard`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from mechfaith.circuits.parts import model_parts
from mechfaith.circuits.pullback import de_embedding, logit_effects, pullback, top_k
from mechfaith.circuits.replacement import Transcoder
from mechfaith.errors import ConfigError
from mechfaith.lm.adapters import get_adapter

BANDS = ((0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25))


def collect_activations(model: Any, tc: Transcoder, contexts: Tensor, features: Sequence[int],
                        batch_contexts: int = 8) -> Tensor:
    """Activations [n_contexts, seq, len(features)] of ``features`` of ``tc`` on ``contexts``."""
    return collect_layer_activations(model, {tc.layer: tc}, contexts, {tc.layer: features},
                                     batch_contexts)[tc.layer]


def collect_layer_activations(model: Any, transcoders: Mapping[int, Transcoder], contexts: Tensor,
                              features: Mapping[int, Sequence[int]], batch_contexts: int = 8) -> dict[int, Tensor]:
    """Per layer of ``features``, the activations [n_contexts, seq, len(features[layer])] of those
    features of ``transcoders[layer]`` on ``contexts``: one forward pass per batch for all layers."""
    adapter = get_adapter(model)
    idx = {l: torch.as_tensor(list(fs), dtype=torch.long) for l, fs in features.items()}
    for l, i in idx.items():
        n = transcoders[l].coder.n_latents
        if len(i) and (int(i.min()) < 0 or int(i.max()) >= n):
            raise ConfigError(f"features must be in [0, {n}) for layer {l}")
    sites = [(l, transcoders[l].input_site) for l in idx]
    out: dict[int, list[Tensor]] = {l: [] for l in idx}
    device = next(adapter.model.parameters()).device
    with torch.no_grad():
        for start in range(0, contexts.shape[0], batch_contexts):
            ids = contexts[start:start + batch_contexts].to(device)
            cache = adapter.run_with_cache(ids, sites)
            for l, site in sites:
                coder = transcoders[l].coder
                f = coder.encode(cache[(l, site)].to(coder.W_enc.dtype))
                out[l].append(f[..., idx[l]].float().cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def _window(acts: Tensor, ids: Tensor, c: int, p: int, before: int, after: int,
            token_str: Callable[[int], str]) -> dict[str, Any]:
    lo, hi = max(0, p - before), min(ids.shape[1], p + after + 1)
    return {"context": c, "pos": p, "max": float(acts[c, p]),
            "tokens": [token_str(int(t)) for t in ids[c, lo:hi]],
            "acts": [float(a) for a in acts[c, lo:hi]], "focus": p - lo}


def feature_summary(acts: Tensor, ids: Tensor, token_str: Callable[[int], str], *, per_band: int = 5,
                    before: int = 12, after: int = 4, skip_first: int = 1, bins: int = 20,
                    seed: int = 0) -> dict[str, Any]:
    """Density, histogram and banded examples of one feature from its activations [n, seq]."""
    body = acts[:, skip_first:]
    n_tok = body.numel()
    active = body > 0
    density = float(active.sum()) / max(1, n_tok)
    mx = float(body.max()) if n_tok else 0.0
    vals = body[active]
    hist: dict[str, Any] = {"edges": [], "counts": []}
    if vals.numel():
        lo = float(vals.min())
        edges = torch.linspace(lo, mx if mx > lo else lo + 1e-6, bins + 1)
        hist = {"edges": edges.tolist(), "counts": torch.histc(vals, bins, edges[0].item(), edges[-1].item()).tolist()}
    g = torch.Generator().manual_seed(seed)
    bands = []
    masked = acts.clone()
    masked[:, :skip_first] = 0
    for lo_f, hi_f in BANDS:
        lo_v, hi_v = lo_f * mx, hi_f * mx
        sel = (masked > lo_v) & (masked <= hi_v) if mx > 0 else torch.zeros_like(masked, dtype=torch.bool)
        cand = sel.nonzero().tolist()
        examples = []
        if cand:
            if lo_f == BANDS[0][0]:
                cand.sort(key=lambda cp: -float(masked[cp[0], cp[1]]))
            else:
                perm = torch.randperm(len(cand), generator=g).tolist()
                cand = [cand[i] for i in perm]
            used: set[int] = set()
            for c, p in cand:
                if c in used:
                    continue
                used.add(c)
                examples.append(_window(acts, ids, c, p, before, after, token_str))
                if len(examples) >= per_band:
                    break
        bands.append({"low": lo_v, "high": hi_v, "label": f"{lo_f:.0%}-{hi_f:.0%} of max",
                      "n_tokens": int(sel.sum()), "examples": examples})
    return {"density": density, "n_tokens": n_tok, "max": mx, "histogram": hist, "bands": bands}


def feature_dashboards(model: Any, transcoders: Mapping[int, Transcoder], contexts: Tensor,
                       features: Sequence[tuple[int, int]], token_str: Callable[[int], str], *,
                       k: int = 10, per_band: int = 5, batch_contexts: int = 8) -> list[dict[str, Any]]:
    """Dashboard data for each ``(layer, index)`` in ``features`` (none: an empty list)."""
    if not features:  # a pruned graph may keep no feature of positive influence
        return []
    parts = model_parts(model)
    by_layer: dict[int, list[int]] = {}
    for layer, idx in features:
        if layer not in transcoders:
            raise ConfigError(f"no transcoder for layer {layer} (have {sorted(transcoders)})")
        by_layer.setdefault(layer, []).append(idx)
    acts = collect_layer_activations(model, transcoders, contexts, by_layer, batch_contexts)
    out = []
    for layer, idx in features:
        tc = transcoders[layer]
        a = acts[layer][..., by_layer[layer].index(idx)]
        d = {"layer": layer, "index": idx, "name": f"mlp{layer}tc[{idx}]",
             **feature_summary(a, contexts, token_str, per_band=per_band)}
        with torch.no_grad():
            d["de_embedding"] = top_k(de_embedding(parts, tc, idx), k).table(token_str)
            d["logit_effects"] = top_k(logit_effects(parts, tc, idx), k).table(token_str)
            earlier = [l for l in transcoders if l < layer]
            if earlier:
                prev = max(earlier)
                d["pullback_layer"] = prev
                d["pullbacks"] = top_k(pullback(parts, tc, idx, transcoders[prev]), k).table(
                    _latent_label(prev))
        out.append(d)
    return out


def _latent_label(layer: int) -> Callable[[int], str]:
    """Labels ``mlp{layer}tc[i]`` for the latents of the transcoder at ``layer``."""
    return lambda i: f"mlp{layer}tc[{i}]"
