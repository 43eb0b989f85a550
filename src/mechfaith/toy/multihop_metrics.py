"""What the multi-hop toy measures of a (cross-layer) transcoder, exactly, over every input pattern.

All numbers are expectations over the data: sums over the ``2^n_inputs`` patterns weighted by their
probability (``w``). For each *later-layer target* -- feature ``h[k, t + 1]``, written by MLP_t,
t >= 1 -- with unit direction ``e = E[h[k, t + 1]]``:

- ``cross_layer_share``: the share of the replacement's write of e at layer t that comes from
  latents of earlier layers. Latent i of layer s writes ``f_si(x) (W_dec[s -> t][i] . e)``;
  ``omega_si = E_w |f_si W_dec[s -> t][i] . e|``; share = ``sum_{s < t} omega / sum_{s <= t} omega``.
  A faithful replacement has 0 (MLP_t's output is written by layer-t latents), a shortcut 1.
- ``intermediate_read_share``: do the writing latents read the intermediate feature ``h[k, t]``
  (MLP_t's operand, computed by MLP_{t-1}) or the raw history it summarises (``a[k, 0..t]`` and
  ``h[k, 1..t-1]``)? For latent (s, i) with encoder column w: ``|w . E[h[k,t]]| / (|w . E[h[k,t]]| +
  sum_{history} |w . E[j]|)`` when s = t, and 0 when s < t (``h[k, t]`` is not in x_s: such a
  latent cannot read it). Averaged over the writing latents with weights omega. Faithful: 1.
- ``ablation_response``: remove ``h[k, t]`` from layer t's input only (``x_t -= (x_t . E) E`` for
  ``E = E[h[k, t]]``; every other layer's input as it was) and compare the change of the replacement's
  layer-t output with the real MLP_t's: ``E_w[dy_hat . dy] / E_w[|dy|^2]`` (1: responds as the
  MLP does; 0: does not respond -- it never reads h[k, t]). ``ablation_error`` is
  ``E_w|dy_hat - dy|^2 / E_w|dy|^2`` (0 when the responses agree).
- ``injection_response`` / ``injection_error``: the same for writing ``h[k, t]`` into layer t's input
  where it is 0 (``x_t += E``): the MLP then computes ``h[k, t + 1] = a[k, t + 1]``.

And per layer t: ``jacobian_rel_error[t] = E_w ||J_t - J_MLP_t||_F^2 / E_w ||J_MLP_t||_F^2``, the CLT's
local Jacobian (:meth:`~mechfaith.coders.clt.CrossLayerTranscoder.local_jvp` on every basis
vector) against the MLP's (:func:`~mechfaith.faithfulness.jacobian.exact_jacobians`);
``fvu[t]``; ``l0[t]`` (expected active latents per input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechfaith.coders.clt import CLTOutput, CrossLayerTranscoder
from mechfaith.faithfulness.jacobian import exact_jacobians
from mechfaith.toy.multihop_model import MultihopNet


@dataclass
class TargetMeasures:
    """The numbers of one later-layer target feature ``h[k, t + 1]``."""

    feature: str
    chain: int
    layer: int  # t: the layer whose MLP writes the feature
    cross_layer_share: float
    intermediate_read_share: float
    ablation_response: float
    ablation_error: float
    injection_response: float
    injection_error: float
    write_by_source: list[float] = field(default_factory=list)  # omega summed per source layer s = 0..t


@dataclass
class CLTMeasures:
    """Every number of one replacement (see the module docstring)."""

    targets: list[TargetMeasures]
    jacobian_rel_error: list[float]  # per layer
    fvu: list[float]  # per layer
    l0: list[float]  # per layer

    def mean(self, name: str, layer: int | None = None) -> float:
        """Mean of a target field over the later-layer targets (of one layer when given)."""
        vals = [getattr(t, name) for t in self.targets if layer is None or t.layer == layer]
        return float(sum(vals) / len(vals)) if vals else float("nan")


def _wmean(values: Tensor, w: Tensor) -> float:
    """``E_w[values]`` over the patterns (values [P] or [P, ...] summed over the rest)."""
    v = values.double().reshape(values.shape[0], -1).sum(1)
    return float((v * w).sum())


def write_weights(clt: CrossLayerTranscoder, out: CLTOutput, t: int, e: Tensor, w: Tensor) -> dict[int, Tensor]:
    """``omega_si`` [n] for each source layer s of target layer t, along direction e."""
    res = {}
    for s in clt.sources_of(t):
        d = clt.decoder_to(s, t) @ e  # [n]
        res[s] = ((out.f[s] * d).abs().double() * w.unsqueeze(1)).sum(0)
    return res


def read_share(w_enc: Tensor, E: Tensor, operand: int, history: list[int]) -> Tensor:
    """Per latent [n]: ``|w . E[op]| / (|w . E[op]| + sum_history |w . E[j]|)`` (0 when all vanish)."""
    op = (E[operand] @ w_enc).abs()
    hist = (E[history] @ w_enc).abs().sum(0)
    tot = op + hist
    return torch.where(tot > 0, op / tot.clamp_min(1e-30), torch.zeros_like(tot))


def _intervene(clt: CrossLayerTranscoder, net: MultihopNet, x: Tensor, y_hat: Tensor, t: int,
               x_t: Tensor, w: Tensor) -> tuple[float, float]:
    """(response, error) of the replacement's layer-t output when layer t's input becomes ``x_t``."""
    xi = x.clone()
    xi[t] = x_t
    dy = net.mlps[t](x_t) - net.mlps[t](x[t])
    dyh = clt(xi)[t] - y_hat[t]
    ref = _wmean(dy.pow(2), w)
    if ref == 0:
        return float("nan"), float("nan")
    return _wmean(dyh * dy, w) / ref, _wmean((dyh - dy).pow(2), w) / ref


def local_jacobians(clt: CrossLayerTranscoder, out: CLTOutput) -> Tensor:
    """Every layer's local Jacobian [L, P, d_out, d_in] from ``local_jvp`` on the basis vectors."""
    L, P, d = out.f.shape[0], out.f.shape[1], clt.d_in
    cols = []
    for i in range(d):
        v = torch.zeros(L, P, d, dtype=out.f.dtype)
        v[..., i] = 1.0
        cols.append(clt.local_jvp(out, v))
    return torch.stack(cols, dim=-1)


def _target(clt: CrossLayerTranscoder, net: MultihopNet, x: Tensor, out: CLTOutput, w: Tensor, k: int,
            t: int) -> TargetMeasures:
    lay, E = net.layout, net.E
    j, op = lay.h(k, t + 1), lay.h(k, t)
    omega = write_weights(clt, out, t, E[j], w)
    total = sum(float(o.sum()) for o in omega.values())
    cross = sum(float(o.sum()) for s, o in omega.items() if s < t)
    history = [lay.a(k, i) for i in range(t + 1)] + [lay.h(k, m) for m in range(1, t)]
    reads = 0.0
    if t in omega and total > 0:
        reads = float((read_share(clt.W_enc[t], E, op, history).double() * omega[t]).sum()) / total
    on = net.features(x[t])[:, op]
    e_op = E[op]
    ablated = x[t] - on.unsqueeze(1) * e_op
    injected = x[t] + (1.0 - on.round()).unsqueeze(1) * e_op
    a_resp, a_err = _intervene(clt, net, x, out.y_hat, t, ablated, w)
    i_resp, i_err = _intervene(clt, net, x, out.y_hat, t, injected, w)
    return TargetMeasures(lay.names()[j], k, t, cross / total if total > 0 else float("nan"), reads,
                          a_resp, a_err, i_resp, i_err,
                          [float(omega[s].sum()) if s in omega else 0.0 for s in range(t + 1)])


@torch.no_grad()
def measure_clt(clt: CrossLayerTranscoder, net: MultihopNet, a: Tensor, w: Tensor) -> CLTMeasures:
    """Every number of the module docstring for the patterns ``a`` [P, n_inputs] with weights ``w`` [P]."""
    x, y = net.run(a)
    out = clt.forward_full(x)
    L = net.n_layers
    targets = [_target(clt, net, x, out, w, k, t) for t in range(1, L) for k in range(net.layout.n_chains)]
    jc = local_jacobians(clt, out)
    jerr, fvu, l0 = [], [], []
    for t in range(L):
        jm = exact_jacobians(net.mlps[t], x[t])
        jerr.append(_wmean((jc[t] - jm).pow(2), w) / max(_wmean(jm.pow(2), w), 1e-30))
        mean = (y[t] * w.unsqueeze(1).to(y.dtype)).sum(0)
        fvu.append(_wmean((out.y_hat[t] - y[t]).pow(2), w) / max(_wmean((y[t] - mean).pow(2), w), 1e-30))
        l0.append(_wmean(out.mask[t].float(), w))
    return CLTMeasures(targets, jerr, fvu, l0)
