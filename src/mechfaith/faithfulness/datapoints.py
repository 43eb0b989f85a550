"""A detector of datapoint features: features that fire on repeats of one input and write its output.

Works on plain tensors: a coder, the function it replaces (``reference``, e.g. the real MLP), and a
sample of inputs ``x`` [N, d_in] that may contain repeats (optionally ``keys`` [N], an integer per
row that is equal for rows with an identical context, e.g. a hash of the preceding tokens; -1 =
no key). Two rows are *near-identical* when their inputs have cosine similarity >= ``dup_cosine``
or they share a key >= 0.

For every feature i with at least ``min_active`` active rows in the sample:

1. ``top_share``: of its ``top_k`` largest activations, the share that falls into the largest group
   of near-identical rows (the issue's "share of a feature's top activations that come from
   identical or near-identical contexts"). The group is formed around the top row that has the most
   near-identical partners among the top rows (ties: the larger activation); that row is the
   feature's *repeated input* ``x*``.
2. ``mass_share``: for features with ``top_share >= candidate_share``, the share of the feature's
   whole activation mass ``sum_n f_i(x_n)`` that comes from rows near-identical to ``x*``. This is
   what separates a datapoint feature (fires only on the repeats: share near 1) from an ordinary
   feature that merely happens to fire strongly on a frequent repeated input (its top rows are all
   repeats, but most of its mass comes from diverse inputs).
3. The toy memorization metric's analogue at ``x*`` with ``y* = reference(x*)``: the contribution
   ``c_i = f_i(x*) W_dec[i]`` along the repeated input's own output, ``c_i . y*/||y*||``, beyond its
   largest component along a set of *generic* unit directions G::

       memorization_i = ReLU( c_i . y*/||y*||  -  max_{g in G} c_i . g )

   By default G is the standard basis restricted to the support of ``y*`` (``y*_j != 0``), which
   is exactly the toy metric (:func:`mechfaith.faithfulness.memorization.feature_memorization`)
   when ``x* = p`` and ``y* = |p| = p``. ``memorization_rel = memorization / ||y*||`` is scale-free;
   ``output_share = c_i . y* / ||y*||^2`` is the share of the repeated output written by the feature.

A feature is flagged as a datapoint feature when ``mass_share >= mass_threshold`` and
``memorization_rel >= memorization_threshold``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError, InputError

Fn = Callable[[Tensor], Tensor]


@dataclass
class DatapointConfig:
    """Settings of the datapoint-feature detector."""

    top_k: int = doc("Top activations examined per feature.", 32)
    min_active: int = doc("Features active on fewer rows of the sample are not judged.", 4)
    dup_cosine: float = doc("Rows whose inputs have at least this cosine similarity count as "
                            "near-identical (rows with equal context keys always do).", 0.98)
    candidate_share: float = doc("Features whose top-activation share from one group reaches "
                                 "this are examined further (mass share, memorization).", 0.5)
    mass_threshold: float = doc("Flag when at least this share of the feature's activation mass "
                                "comes from the repeated input.", 0.5)
    memorization_threshold: float = doc("... and its memorization analogue is at least this "
                                        "fraction of ||y*||.", 0.1)
    chunk_size: int = doc("Rows per chunk when encoding the sample.", 4096)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.top_k < 1 or self.min_active < 1 or self.chunk_size < 1:
            raise ConfigError("DatapointConfig: top_k, min_active and chunk_size must be >= 1")
        for name in ("dup_cosine", "candidate_share", "mass_threshold"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"DatapointConfig.{name} must be in (0, 1], got {v!r}")
        if self.memorization_threshold < 0:
            raise ConfigError("DatapointConfig.memorization_threshold must be >= 0")


@dataclass
class FeatureRepeatStats:
    """What the detector measured for one examined feature."""

    index: int
    n_active: int  # rows of the sample where f_i > 0
    top_share: float  # share of the top-k activations from the largest near-identical group
    repeated_row: int  # the row x* of the sample
    mass_share: float | None  # share of the activation mass from rows near-identical to x*
    activation_at_repeat: float | None  # f_i(x*)
    output_share: float | None  # c_i . y* / ||y*||^2
    memorization: float | None  # ReLU(c_i . y_hat* - max_g c_i . g)
    memorization_rel: float | None  # memorization / ||y*||
    flagged: bool = False


@dataclass
class DatapointReport:
    """The detector's result on one sample."""

    flagged: list[FeatureRepeatStats]  # datapoint features, largest mass share first
    candidates: list[FeatureRepeatStats]  # every feature examined beyond its top share
    top_share: Tensor  # [n_latents] (NaN for features with fewer than min_active active rows)
    n_active: Tensor  # [n_latents] int64
    n_rows: int
    config: DatapointConfig

    def to_dict(self, max_candidates: int = 50) -> dict[str, Any]:
        judged = ~torch.isnan(self.top_share)
        return {
            "n_rows": self.n_rows, "n_latents": int(self.top_share.shape[0]),
            "n_judged": int(judged.sum()), "n_candidates": len(self.candidates),
            "n_flagged": len(self.flagged), "flagged": [asdict(s) for s in self.flagged],
            "candidates": [asdict(s) for s in self.candidates[:max_candidates]],
            "top_share_histogram": _histogram(self.top_share[judged]),
            "config": asdict(self.config),
        }


def _histogram(values: Tensor, bins: int = 10) -> dict[str, list[float]]:
    edges = torch.linspace(0, 1, bins + 1)
    counts = torch.histc(values.double(), bins=bins, min=0.0, max=1.0) if values.numel() else torch.zeros(bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _check(coder: SparseCoder, x: Tensor, keys: Tensor | None) -> Tensor:
    if not isinstance(coder, SparseCoder):
        raise InputError(f"the datapoint detector needs a SparseCoder, got {type(coder).__name__}")
    x = coder.check_batch(x, "x")
    if x.shape[0] == 0:
        raise InputError("the sample x is empty")
    if keys is not None and (not isinstance(keys, Tensor) or keys.shape != (x.shape[0],)
                             or keys.is_floating_point()):
        raise InputError(f"keys must be an integer tensor of shape [{x.shape[0]}] (one per row)")
    return x


@torch.no_grad()
def _scan(coder: SparseCoder, x: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k activations and rows [k, n], total mass [n] and active counts [n], in chunks of rows."""
    n = coder.n_latents
    vals = torch.full((0, n), float("-inf"), dtype=x.dtype)
    rows = torch.zeros((0, n), dtype=torch.long)
    mass = torch.zeros(n, dtype=torch.float64)
    active = torch.zeros(n, dtype=torch.long)
    for i in range(0, x.shape[0], chunk):
        f = coder.encode(x[i:i + chunk].to(coder.W_enc.device)).cpu()  # [c, n]
        mass += f.double().sum(0)
        active += (f > 0).sum(0)
        cat_v = torch.cat([vals, f])
        cat_r = torch.cat([rows, torch.arange(i, i + f.shape[0]).unsqueeze(1).expand(-1, n)])
        kk = min(k, cat_v.shape[0])
        vals, pos = cat_v.topk(kk, dim=0)
        rows = cat_r.gather(0, pos)
    return vals, rows, mass, active


def _near(a: Tensor, b: Tensor, keys: Tensor | None, ka: Tensor | None, kb: Tensor | None,
          thr: float) -> Tensor:
    """Near-identity of rows a [..., d] (unit) and b [..., d] (unit) as a bool matrix a x b."""
    sim = a @ b.transpose(-1, -2) >= thr
    if keys is not None:
        assert ka is not None and kb is not None  # given together with keys
        same = (ka.unsqueeze(-1) == kb.unsqueeze(-2)) & (ka.unsqueeze(-1) >= 0)
        sim = sim | same
    return sim


@torch.no_grad()
def detect_datapoint_features(coder: SparseCoder, reference: Fn, x: Tensor, keys: Tensor | None = None,
                              cfg: DatapointConfig | None = None,
                              generic: Tensor | None = None) -> DatapointReport:
    """Run the detector (module docstring) on the sample ``x`` [N, d_in].

    ``generic``: unit generic output directions [m, d_out] (default: the standard basis on the
    support of each feature's ``y*``). The coder should be in eval mode.
    """
    cfg = cfg or DatapointConfig()
    x = _check(coder, x, keys)
    dev = coder.W_enc.device
    xc = x.detach().to(coder.W_enc.dtype).cpu()
    keys_c = keys.cpu().long() if keys is not None else None
    xn = F.normalize(xc, dim=1)
    vals, rows, mass, active = _scan(coder, xc, cfg.top_k, cfg.chunk_size)
    n_lat = coder.n_latents
    top_share = torch.full((n_lat,), float("nan"))
    rep_row = torch.full((n_lat,), -1, dtype=torch.long)
    judged = torch.nonzero(active >= cfg.min_active).flatten()
    # 1. top share, in groups of features (bounded memory: [g, k, d])
    for s in range(0, judged.numel(), 256):
        feats = judged[s:s + 256]
        kk = rows.shape[0]
        r = rows[:, feats].T  # [g, k]
        live = vals[:, feats].T > 0  # [g, k]; only active rows count
        units = xn[r]  # [g, k, d]
        near = _near(units, units, keys_c, None if keys_c is None else keys_c[r],
                     None if keys_c is None else keys_c[r], cfg.dup_cosine)
        near &= live.unsqueeze(1) & live.unsqueeze(2)
        counts = near.sum(2).double()  # [g, k] group size around each top row
        # ties -> the earlier (larger) activation: subtract a tiny rank term
        best = (counts - torch.arange(kk).double() * 1e-6).argmax(1)  # [g]
        n_live = live.sum(1).clamp_min(1).double()
        top_share[feats] = (counts.gather(1, best.unsqueeze(1)).squeeze(1) / n_live).float()
        rep_row[feats] = r.gather(1, best.unsqueeze(1)).squeeze(1)
    cands = torch.nonzero(top_share >= cfg.candidate_share).flatten()
    stats: list[FeatureRepeatStats] = []
    if cands.numel():
        reps = rep_row[cands]  # [C]
        # 2. mass share: rows near-identical to each candidate's x*, and f_i summed over them
        cmass = torch.zeros(cands.numel(), dtype=torch.float64)
        for i in range(0, xc.shape[0], cfg.chunk_size):
            member = _near(xn[i:i + cfg.chunk_size], xn[reps], keys_c,
                           None if keys_c is None else keys_c[i:i + cfg.chunk_size],
                           None if keys_c is None else keys_c[reps], cfg.dup_cosine)  # [c, C]
            f = coder.encode(xc[i:i + cfg.chunk_size].to(dev)).cpu()[:, cands]  # [c, C]
            cmass += (f.double() * member).sum(0)
        mass_share = cmass / mass[cands].clamp_min(1e-300)
        # 3. memorization analogue at x*
        x_star = xc[reps]  # [C, d_in]
        y_star = reference(x_star.to(x.device)).detach().cpu().to(xc.dtype)  # [C, d_out]
        f_star = coder.encode(x_star.to(dev)).cpu().gather(1, cands.unsqueeze(1)).squeeze(1)  # [C]
        contrib = f_star.unsqueeze(1) * coder.W_dec.detach().cpu()[cands]  # [C, d_out]
        y_norm = y_star.norm(dim=1).clamp_min(1e-30)
        along = (contrib * y_star).sum(1) / y_norm
        if generic is None:
            masked = torch.where(y_star != 0, contrib, torch.full_like(contrib, float("-inf")))
            best_generic = masked.max(1).values
            best_generic = torch.where(torch.isfinite(best_generic), best_generic, torch.zeros_like(best_generic))
        else:
            if generic.ndim != 2 or generic.shape[1] != coder.d_out:
                raise InputError(f"generic directions must be [m, {coder.d_out}], got {tuple(generic.shape)}")
            g = F.normalize(generic.detach().cpu().to(xc.dtype), dim=1)
            best_generic = (contrib @ g.T).max(1).values
        memo = torch.relu(along - best_generic)
        for j, i in enumerate(cands.tolist()):
            share, memo_rel = float(mass_share[j]), float(memo[j] / y_norm[j])
            st = FeatureRepeatStats(
                index=i, n_active=int(active[i]), top_share=float(top_share[i]), repeated_row=int(reps[j]),
                mass_share=share, activation_at_repeat=float(f_star[j]),
                output_share=float(along[j] / y_norm[j]), memorization=float(memo[j]),
                memorization_rel=memo_rel)
            st.flagged = share >= cfg.mass_threshold and memo_rel >= cfg.memorization_threshold
            stats.append(st)
    stats.sort(key=lambda s: (-(s.mass_share or 0.0), s.index))
    return DatapointReport([s for s in stats if s.flagged], stats, top_share, active, int(xc.shape[0]), cfg)
