"""What the memorization experiment measures for one trained transcoder (one cell).

Notation: ``f_i(x)`` the coder's latents, ``W_dec[i]`` feature i's decoder row, ``y = MLP(x)``.
P = the passage's rows (the repeated inputs: positions 1..m of a planted context), H = held-out
ordinary rows (validation documents, BOS dropped).

- ``fve``, ``l0``, ``mse`` on H.
- ``jacobian_rel`` (± SE): ``E||J_mlp v - J_tc v||^2 / E||J_mlp v||^2`` on H (JVP estimator,
  Gaussian probes); ``passage_jacobian_rel`` the same on P.
- ``passage_mse_ratio``: MSE on P / MSE on H. Below 1: the coder fits the passage better than
  ordinary text (a coder that never saw the passage sits near or above 1).
  ``skip_passage_mse_ratio``: the same for the coder's linear part alone (skip + decoder bias, no
  latents): a linear map of d_in x d_out weights can fit a passage of fewer than d_in tokens too,
  so this says whether the skip or the latents absorbed the passage.
- **Memorization** (the toy metric's analogue, see below): *passage features* are the features that
  fire on at least one row of P but on at most ``exclusive_rate`` of the rows of H (they exist for
  the passage, not for language). ``memorization`` is the share of the MLP's output on the passage
  written by them, ``mean_t (sum_{i in S} f_i(x_t) W_dec[i]) . y_t / ||y_t||^2``;
  ``n_passage_features`` counts them. In the toy model, memorization is a feature's contribution
  along the datapoint's own output beyond what generic features write; here "generic" is
  "fires on ordinary text", which needs no basis of generic directions.
- ``datapoint_flagged``: the datapoint-feature detector (:mod:`mechfaith.faithfulness.datapoints`)
  on a held-out sample with the passage planted into a share of its contexts.
- ``ce_increase`` and ``kl``: spliced CE minus clean CE (nats/token) and KL on H's contexts;
  ``passage_ce_increase``: the same on the passage's tokens in planted held-out contexts.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.faithfulness.agreement import per_row_jvp_errors, summarize_errors
from mechfaith.faithfulness.datapoints import DatapointConfig, detect_datapoint_features
from mechfaith.lm.fidelity import kl_per_token, model_device, next_token_ce
from mechfaith.lm.splice import splice
from mechfaith.studies.memorization_specific import fit_parts, specific_features

Fn = Callable[[Tensor], Tensor]


@torch.no_grad()
def _encode(coder: SparseCoder, x: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(latents [N, n], outputs [N, d_out]) in chunks."""
    fs, ys = [], []
    for i in range(0, x.shape[0], chunk):
        out = coder.forward_full(x[i:i + chunk].to(coder.W_enc.dtype))
        fs.append(out.f)
        ys.append(out.y_hat)
    return torch.cat(fs), torch.cat(ys)


@torch.no_grad()
def passage_features(coder: SparseCoder, x_passage: Tensor, y_passage: Tensor, f_heldout: Tensor,
                     exclusive_rate: float = 1e-3) -> dict[str, Any]:
    """The passage features and the memorization share (module docstring); ``f_heldout`` [N, n] are
    the coder's latents on the held-out rows."""
    f_h = f_heldout
    f_p, _ = _encode(coder, x_passage)
    rate_h = (f_h > 0).float().mean(0)  # [n]
    fires_p = (f_p > 0).any(0)  # [n]
    chosen = fires_p & (rate_h <= exclusive_rate)
    idx = torch.nonzero(chosen).flatten()
    y = y_passage.to(f_p.dtype)
    contrib = f_p[:, idx] @ coder.W_dec[idx]  # [m, d_out]
    share = (contrib * y).sum(1) / y.pow(2).sum(1).clamp_min(1e-30)  # [m]
    per_feature = []
    if idx.numel():
        # each passage feature's own share, summed over the passage rows it fires on
        w = (f_p[:, idx].unsqueeze(-1) * coder.W_dec[idx].unsqueeze(0) * y.unsqueeze(1)).sum(-1)  # [m, s]
        w = w / y.pow(2).sum(1, keepdim=True).clamp_min(1e-30)
        tops = w.max(0)
        for j, i in enumerate(idx.tolist()):
            per_feature.append({"index": i, "max_output_share": float(tops.values[j]),
                                "passage_position": int(tops.indices[j]) + 1,
                                "passage_rows_active": int((f_p[:, i] > 0).sum()),
                                "heldout_rate": float(rate_h[i])})
        per_feature.sort(key=lambda d: -d["max_output_share"])
    return {"memorization": float(share.mean()), "memorization_max": float(share.max()),
            "n_passage_features": int(idx.numel()), "passage_features": per_feature[:20],
            "exclusive_rate": exclusive_rate}


def jacobian_error(reference: Fn, coder: SparseCoder, x: Tensor, n_probes: int, seed: int) -> dict[str, float]:
    """The JVP estimate of the relative Jacobian error on the rows ``x``."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    err, ref = per_row_jvp_errors(reference, coder, x.to(coder.W_enc.dtype), n_probes, g)
    est = summarize_errors(err, ref, n_probes)
    return {"rel": est.rel_error, "se": est.rel_error_se, "n": est.n_inputs}


@torch.no_grad()
def spliced_ce(adapter: Any, coder: SparseCoder, contexts: Tensor, layer: int, input_site: str,
               output_site: str, *, positions: slice | None = None, batch_contexts: int = 16,
               clean: dict[int, Tensor] | None = None) -> dict[str, float]:
    """Clean and spliced next-token CE (nats/token) and KL(clean || spliced) on ``contexts``,
    over the predictions at ``positions`` (default all). ``clean``: a dict filled with / reused
    for the clean log-probs (one cell after another share them)."""
    device = model_device(adapter)
    sums = {"clean": 0.0, "spliced": 0.0, "kl": 0.0}
    count = 0
    for b, i in enumerate(range(0, contexts.shape[0], batch_contexts)):
        ids = contexts[i:i + batch_contexts].to(device)
        if clean is not None and b in clean:
            clean_logp = clean[b]
        else:
            clean_logp = torch.log_softmax(adapter.logits(ids).float(), dim=-1)
            if clean is not None:
                clean[b] = clean_logp
        with splice(adapter, {layer: coder}, input_site, output_site):
            logits = adapter.logits(ids).float()
        sel = positions or slice(0, ids.shape[1] - 1)
        ce_c = next_token_ce(clean_logp, ids)[:, sel]  # log-softmax is idempotent under CE
        ce_s = next_token_ce(logits, ids)[:, sel]
        kl = kl_per_token(clean_logp[:, :-1], logits[:, :-1])[:, sel]
        sums["clean"] += float(ce_c.double().sum())
        sums["spliced"] += float(ce_s.double().sum())
        sums["kl"] += float(kl.double().sum())
        count += ce_c.numel()
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["increase"] = out["spliced"] - out["clean"]
    return out


@torch.no_grad()
def measure_cell(coder: SparseCoder, reference: Fn, data: Any, *, adapter: Any, layer: int, input_site: str,
                 output_site: str, jacobian_rows: int = 2048, n_probes: int = 4, passage_probes: int = 32,
                 exclusive_rate: float = 1e-3, detector: DatapointConfig | None = None,
                 batch_contexts: int = 16, seed: int = 0, specific_ratio: float = 10.0,
                 passage_tokens: list[str] | None = None,
                 clean_cache: dict[str, dict[int, Tensor]] | None = None) -> dict[str, Any]:
    """Every metric of one cell (module docstring, and the passage-specific features and fit parts
    of :mod:`mechfaith.studies.memorization_specific`); ``data`` is an
    :class:`~mechfaith.studies.memorization_data.ExperimentData`."""
    coder = coder.eval()
    dt = coder.W_enc.dtype
    x_h, y_h = data.x_eval.to(dt), data.y_eval.to(dt)
    f_h, yhat_h = _encode(coder, x_h)
    mse_h = float((yhat_h - y_h).pow(2).sum(1).mean())
    var_h = float((y_h - y_h.mean(0)).pow(2).sum(1).mean())
    x_p, y_p = data.x_passage.to(dt), data.y_passage.to(dt)
    f_p, yhat_p = _encode(coder, x_p)
    mse_p = float((yhat_p - y_p).pow(2).sum(1).mean())
    skip_ratio = math.nan
    if coder.cfg.skip:
        lin_h = x_h @ coder.W_skip + coder.b_dec
        lin_p = x_p @ coder.W_skip + coder.b_dec
        skip_ratio = float((lin_p - y_p).pow(2).sum(1).mean() / (lin_h - y_h).pow(2).sum(1).mean().clamp_min(1e-30))
    rows = torch.randperm(x_h.shape[0], generator=torch.Generator().manual_seed(seed))[:jacobian_rows]
    jac_h = jacobian_error(reference, coder, x_h[rows], n_probes, seed)
    jac_p = jacobian_error(reference, coder, x_p, passage_probes, seed + 1)
    mem = passage_features(coder, x_p, y_p, f_h, exclusive_rate)
    specific = specific_features(coder, f_p, f_h, y_p, specific_ratio, passage_tokens)
    parts = fit_parts(coder, x_p, y_p, yhat_p, x_h, y_h, yhat_h)
    det = detect_datapoint_features(coder, reference, data.x_detector.to(dt), data.detector_keys,
                                    detector or DatapointConfig())
    clean_cache = clean_cache if clean_cache is not None else {}
    ce_h = spliced_ce(adapter, coder, data.eval_contexts, layer, input_site, output_site,
                      batch_contexts=batch_contexts, clean=clean_cache.setdefault("heldout", {}))
    m = len(data.passage_ids)
    # predictions of passage tokens 2..m (the first passage token follows BOS: nothing to recall)
    ce_p = spliced_ce(adapter, coder, data.passage_contexts, layer, input_site, output_site,
                      positions=slice(1, m), batch_contexts=batch_contexts,
                      clean=clean_cache.setdefault("passage", {}))
    return {
        "fve": 1.0 - mse_h / var_h if var_h > 0 else math.nan, "mse": mse_h,
        "l0": float((f_h > 0).sum(1).double().mean()),
        "dead_fraction_heldout": float(((f_h > 0).sum(0) == 0).double().mean()),
        "jacobian_rel": jac_h["rel"], "jacobian_rel_se": jac_h["se"],
        "passage_jacobian_rel": jac_p["rel"], "passage_jacobian_rel_se": jac_p["se"],
        "passage_mse": mse_p, "passage_mse_ratio": mse_p / mse_h if mse_h > 0 else math.nan,
        "skip_passage_mse_ratio": skip_ratio,
        "memorization": mem["memorization"], "memorization_max": mem["memorization_max"],
        "n_passage_features": mem["n_passage_features"], "passage_features": mem["passage_features"],
        "datapoint_flagged": len(det.flagged),
        "datapoint_features": [{"index": s.index, "mass_share": s.mass_share, "output_share": s.output_share,
                                "memorization_rel": s.memorization_rel} for s in det.flagged[:20]],
        "ce_clean": ce_h["clean"], "ce_spliced": ce_h["spliced"], "ce_increase": ce_h["increase"],
        "kl": ce_h["kl"], "passage_ce_clean": ce_p["clean"], "passage_ce_increase": ce_p["increase"],
        **specific, **parts,
    }


__all__ = ["jacobian_error", "measure_cell", "passage_features", "spliced_ce"]
