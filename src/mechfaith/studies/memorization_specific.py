"""Two more measurements of the memorization experiment's cells (beside
:mod:`mechfaith.studies.memorization_metrics`): passage-specific features by a looser criterion,
and which part of the coder writes its output on the passage.

- **Passage-specific features** (the looser datapoint-feature criterion): features whose largest
  activation on the passage's rows P is positive and at least ``ratio`` (10) times their largest
  activation on ANY held-out row H: ``max_{t in P} f_i(x_t) >= ratio * max_{h in H} f_i(x_h)``.
  Unlike the passage features of the memorization metric (which must almost never fire on H) they
  may fire on ordinary text, only much more weakly. ``specific_share`` is the share of the MLP's
  output on the passage they write, ``mean_t (sum_{i in S} f_i(x_t) W_dec[i]) . y_t / ||y_t||^2``;
  each one is listed with its top activating passage tokens and its ratio (None when it never
  fires on a held-out row).
- **Fit parts**: the coder's output is its linear part (decoder bias, plus the skip ``x W_skip``
  when it has one) plus its features' part (``sum_i f_i W_dec[i]``). ``linear_share`` and
  ``feature_share`` are the shares of the MLP's output each writes, ``mean_t part_t . y_t /
  ||y_t||^2``, on the passage (``passage_*``) and on held-out rows (``heldout_*``); the two add up
  to the whole coder's share. ``linear_passage_mse_ratio``: passage MSE / held-out MSE of the linear
  part alone (for a coder without a skip, of its bias: how unusual the passage's outputs are).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder


def output_share(part: Tensor, y: Tensor) -> Tensor:
    """Per row, the share of ``y`` [N, d] written by ``part`` [N, d]: ``part . y / ||y||^2``."""
    return (part * y).sum(1) / y.pow(2).sum(1).clamp_min(1e-30)


@torch.no_grad()
def specific_features(coder: SparseCoder, f_passage: Tensor, f_heldout: Tensor, y_passage: Tensor,
                      ratio: float = 10.0, tokens: list[str] | None = None, top_tokens: int = 3,
                      max_listed: int = 20) -> dict[str, Any]:
    """The passage-specific features (module docstring) from the latents on the passage
    ``f_passage`` [m, n] and on the held-out rows ``f_heldout`` [N, n]; ``tokens``: the passage's
    tokens as text (position t of ``f_passage`` is ``tokens[t]``)."""
    max_p = f_passage.max(0).values
    max_h = f_heldout.max(0).values.clamp_min(0)
    chosen = (max_p > 0) & (max_p >= ratio * max_h)
    idx = torch.nonzero(chosen).flatten()
    y = y_passage.to(f_passage.dtype)
    share = output_share(f_passage[:, idx] @ coder.W_dec[idx], y) if idx.numel() else torch.zeros(y.shape[0])
    listed = []
    for i in sorted(idx.tolist(), key=lambda j: -float(max_p[j]))[:max_listed]:
        acts = f_passage[:, i]
        top = torch.topk(acts, min(top_tokens, acts.numel()))
        listed.append({
            "index": i, "passage_max": float(max_p[i]), "heldout_max": float(max_h[i]),
            "ratio": float(max_p[i] / max_h[i]) if max_h[i] > 0 else None,  # None: never on held-out rows
            "passage_rows_active": int((acts > 0).sum()),
            "top_tokens": [{"position": int(p) + 1, "token": tokens[int(p)] if tokens else str(int(p) + 1),
                            "activation": float(v)} for v, p in zip(top.values, top.indices) if v > 0]})
    return {"n_specific_features": int(idx.numel()), "specific_share": float(share.mean()),
            "specific_ratio": ratio, "specific_features": listed}


@torch.no_grad()
def fit_parts(coder: SparseCoder, x_passage: Tensor, y_passage: Tensor, yhat_passage: Tensor,
              x_heldout: Tensor, y_heldout: Tensor, yhat_heldout: Tensor) -> dict[str, float]:
    """The linear and feature parts' shares of the MLP's output (module docstring), given the
    coder's whole outputs ``yhat_*`` on the same rows."""
    out: dict[str, float] = {}
    mse_lin = {}
    for name, x, y, yhat in (("passage", x_passage, y_passage, yhat_passage),
                             ("heldout", x_heldout, y_heldout, yhat_heldout)):
        lin = coder.b_dec.expand_as(y)
        if coder.W_skip is not None:
            lin = x @ coder.W_skip + coder.b_dec
        out[f"{name}_linear_share"] = float(output_share(lin, y).mean())
        out[f"{name}_feature_share"] = float(output_share(yhat - lin, y).mean())
        mse_lin[name] = float((lin - y).pow(2).sum(1).mean())
    out["linear_passage_mse_ratio"] = mse_lin["passage"] / mse_lin["heldout"] if mse_lin["heldout"] > 0 else math.nan
    return out


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token of ``ids`` as text (its id in angle brackets when the tokenizer cannot decode)."""
    decode = getattr(tokenizer, "decode", None)
    return [decode([i]) if decode is not None else f"<{i}>" for i in ids]


__all__ = ["fit_parts", "output_share", "specific_features", "token_strings"]
