"""Off-distribution behaviour: how much worse a coder imitates its reference away from its data.

On plain tensors and a reference function. For each named input set (the on-distribution held-out
sample, inputs from another text, noise-perturbed inputs) the coder's error against the
reference's own output on those inputs::

    rel_error = sum_n ||coder(x_n) - reference(x_n)||^2 / sum_n ||reference(x_n) - mean_n reference(x_n)||^2

(the fraction of the reference's output variance left unexplained, FVU = 1 - FVE, on that set),
with its delta-method standard error (rows are the sampling unit), and its ratio to the
on-distribution value. ``mse`` (mean over rows of the summed squared error) and ``jacobian`` (the
JVP relative Jacobian error of :mod:`mechfaith.faithfulness.agreement`) are reported next to it.

Noise perturbation (:func:`perturb`): ``x + sigma * rms(x_n) * eps`` with ``eps ~ N(0, I)`` per row,
so ``sigma`` is the noise-to-signal ratio per coordinate (0.1 = noise at 10 % of the row's RMS).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mechfaith.errors import InputError
from mechfaith.faithfulness.agreement import per_row_jvp_errors, ratio_of_means, summarize_errors

Fn = Callable[[Tensor], Tensor]


def perturb(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``x + sigma * rms(x_n) * eps`` (see the module docstring); ``sigma >= 0``."""
    if not sigma >= 0:
        raise InputError(f"noise scale sigma must be >= 0, got {sigma!r}")
    rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + sigma * rms * eps


@torch.no_grad()
def reconstruction_errors(reference: Fn, coder: Fn, x: Tensor, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Per row, ``||coder(x) - reference(x)||^2`` and the reference outputs [N, d_out]."""
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise InputError(f"inputs must be a floating tensor [N, d_in] with N >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    errs, ys = [], []
    for i in range(0, x.shape[0], chunk_size):
        xc = x[i:i + chunk_size]
        y = reference(xc)
        y_hat = coder(xc)
        if y.shape != y_hat.shape:
            raise InputError(f"reference output has shape {tuple(y.shape)}, the coder's {tuple(y_hat.shape)}")
        errs.append((y_hat - y).double().pow(2).sum(-1))
        ys.append(y.double())
    return torch.cat(errs), torch.cat(ys)


def set_errors(reference: Fn, coder: Fn, x: Tensor, *, n_probes: int = 4,
               generator: torch.Generator | None = None, jacobian: bool = True) -> dict[str, Any]:
    """Error statistics of the coder on one input set (module docstring)."""
    err, y = reconstruction_errors(reference, coder, x)
    var = (y - y.mean(0)).pow(2).sum(-1)  # per row, about the set's mean
    rel, rel_se = ratio_of_means(err, var)
    out: dict[str, Any] = {"n": int(x.shape[0]), "mse": float(err.mean()),
                           "rel_error": rel, "rel_error_se": rel_se,
                           "output_norm": float(y.pow(2).sum(-1).mean().sqrt())}
    if jacobian:
        e, r = per_row_jvp_errors(reference, coder, x, n_probes, generator)
        est = summarize_errors(e, r, n_probes)
        out["jacobian_rel_error"] = est.rel_error
        out["jacobian_rel_error_se"] = est.rel_error_se
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _ratio_se(a: float, a_se: float, b: float, b_se: float) -> float:
    """Standard error of a/b for independent a and b (first-order)."""
    if not b > 0 or not a > 0:
        return float("nan")
    r = a / b
    return r * ((a_se / a) ** 2 + (b_se / b) ** 2) ** 0.5


def offdistribution_report(reference: Fn, coder: Fn, on_distribution: Tensor,
                           others: Mapping[str, Tensor] | None = None,
                           noise_scales: tuple[float, ...] = (0.1, 0.3, 1.0), n_probes: int = 4,
                           generator: torch.Generator | None = None,
                           jacobian: bool = True) -> dict[str, Any]:
    """Errors on the on-distribution sample, each of ``others`` (e.g. ``{"other_text": x}``) and the
    on-distribution sample perturbed with each noise scale; each set also as ratios to the
    on-distribution values (``rel_error_ratio``, ``jacobian_ratio``)."""
    base = set_errors(reference, coder, on_distribution, n_probes=n_probes, generator=generator,
                      jacobian=jacobian)
    sets: dict[str, dict[str, Any]] = {"on_distribution": base}
    for name, x in (others or {}).items():
        sets[name] = set_errors(reference, coder, x, n_probes=n_probes, generator=generator, jacobian=jacobian)
    for sigma in noise_scales:
        xs = perturb(on_distribution, sigma, generator)
        sets[f"noise_{sigma:g}"] = set_errors(reference, coder, xs, n_probes=n_probes, generator=generator,
                                              jacobian=jacobian)
    for name, s in sets.items():
        s["rel_error_ratio"] = _ratio(s["rel_error"], base["rel_error"])
        s["rel_error_ratio_se"] = (0.0 if name == "on_distribution" else
                                   _ratio_se(s["rel_error"], s["rel_error_se"], base["rel_error"],
                                             base["rel_error_se"]))
        if jacobian:
            s["jacobian_ratio"] = _ratio(s["jacobian_rel_error"], base["jacobian_rel_error"])
    return {"sets": sets, "noise_scales": list(noise_scales),
            "definition": "rel_error = sum ||coder(x) - ref(x)||^2 / sum ||ref(x) - mean ref(x)||^2 "
                          "on each set (FVU); ratios are to the on-distribution set; noise_s: "
                          "x + s * rms(x) * N(0, I)"}
