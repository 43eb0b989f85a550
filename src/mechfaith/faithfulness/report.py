"""The faithfulness report of one coder against the function it replaces, from plain tensors.

:func:`faithfulness_report` gathers the instruments of this package into one JSON-ready dict:

- ``fidelity``: FVE, MSE and L0 on the held-out sample (all rows and per group);
- ``jacobian``: the JVP relative Jacobian error with its standard error, all rows and per group
  (e.g. BOS vs other positions; :mod:`~mechfaith.faithfulness.agreement`);
- ``spectra``: singular values of the exact Jacobians on a few rows, reference vs coder;
- ``datapoints``: the datapoint-feature detector (:mod:`~mechfaith.faithfulness.datapoints`) on the
  detector sample (which may contain repeats);
- ``offdist``: error ratios on other input sets and noise-perturbed inputs
  (:mod:`~mechfaith.faithfulness.offdist`);
- ``masking``: gradient-masking signs (:mod:`~mechfaith.faithfulness.masking`).

It serves the toy model and language models alike; :mod:`mechfaith.lm.faithfulness` collects the
tensors of a real model's layer and calls it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mechfaith.coders.coder import SparseCoder
from mechfaith.configs import check_finite, doc
from mechfaith.errors import ConfigError, InputError
from mechfaith.faithfulness.agreement import jacobian_agreement, jacobian_spectra, spectra_report
from mechfaith.faithfulness.datapoints import DatapointConfig, detect_datapoint_features
from mechfaith.faithfulness.masking import MaskingConfig, detect_gradient_masking
from mechfaith.faithfulness.offdist import offdistribution_report
from mechfaith.jsonio import json_safe

Fn = Callable[[Tensor], Tensor]
REPORT_FORMAT = "mechfaith.faithfulness"
REPORT_VERSION = 1


@dataclass
class FaithfulnessConfig:
    """What the faithfulness report measures and on how much data."""

    n_probes: int = doc("Gaussian probes per input for the JVP Jacobian-error estimate.", 8)
    spectra_inputs: int = doc("Inputs on which the exact Jacobians and their singular values are "
                              "computed (d_in JVPs each).", 16)
    spectra_top_k: int = doc("Directions counted as the head of a spectrum (the tail is the rest).", 32)
    noise_scales: list[float] = doc("Noise-to-signal ratios of the perturbed inputs (x + s rms(x) N(0, I)).",
                                    default_factory=lambda: [0.1, 0.3, 1.0])
    offdist_probes: int = doc("Probes per input for the Jacobian error of the off-distribution sets.", 2)
    seed: int = doc("Seed of the probes, noise and spectra sample.", 0)
    datapoints: DatapointConfig = doc("Datapoint-feature detector settings.", default_factory=DatapointConfig)
    masking: MaskingConfig = doc("Gradient-masking detector settings.", default_factory=MaskingConfig)

    def __post_init__(self) -> None:
        check_finite(self)
        if self.n_probes < 1 or self.offdist_probes < 1 or self.spectra_inputs < 0 or self.spectra_top_k < 1:
            raise ConfigError("FaithfulnessConfig: n_probes, offdist_probes, spectra_top_k must be >= 1 "
                              "and spectra_inputs >= 0")
        if any(not s >= 0 for s in self.noise_scales):
            raise ConfigError(f"FaithfulnessConfig.noise_scales must be >= 0, got {self.noise_scales}")


@torch.no_grad()
def fidelity_stats(reference: Fn, coder: SparseCoder, x: Tensor, chunk_size: int = 4096) -> dict[str, float]:
    """FVE (1 - SSE / total variance about the mean), MSE (summed over d_out, mean over rows), L0."""
    sse, n, l0 = 0.0, 0, 0.0
    ys = []
    for i in range(0, x.shape[0], chunk_size):
        xc = x[i:i + chunk_size]
        out = coder.forward_full(xc)
        y = reference(xc)
        sse += float((out.y_hat - y).double().pow(2).sum())
        l0 += float((out.f > 0).double().sum())
        ys.append(y.double())
        n += xc.shape[0]
    y = torch.cat(ys)
    var = float((y - y.mean(0)).pow(2).sum())
    return {"n": n, "fve": 1.0 - sse / var if var > 0 else float("nan"), "mse": sse / n, "l0": l0 / n}


def faithfulness_report(reference: Fn, coder: SparseCoder, x: Tensor, *,
                        groups: Mapping[str, Tensor] | None = None,
                        detector_x: Tensor | None = None, detector_keys: Tensor | None = None,
                        other_sets: Mapping[str, Tensor] | None = None, typical: Tensor | None = None,
                        cfg: FaithfulnessConfig | None = None, progress: Callable[[str], None] | None = None,
                        ) -> dict[str, Any]:
    """The whole report (module docstring) as a JSON-ready dict.

    ``x`` [N, d_in]: held-out inputs; ``groups``: name -> bool mask [N] (e.g. bos / other);
    ``detector_x`` / ``detector_keys``: the detector's sample and context keys (default ``x``, no
    keys); ``other_sets``: off-distribution input sets by name; ``typical``: the rows that define
    "on distribution" for the spectra, the off-distribution ratios and the masking statistics
    (default ``x``; for a language model the non-BOS rows). The coder is put in eval mode.
    ``progress``: called with the name of each section as it starts.
    """
    cfg = cfg or FaithfulnessConfig()
    if not isinstance(coder, SparseCoder):
        raise InputError(f"the faithfulness report needs a SparseCoder, got {type(coder).__name__}")
    x = coder.check_batch(x, "x")
    coder.eval()
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
    say = progress or (lambda s: None)
    groups = dict(groups or {})
    typ = coder.check_batch(typical, "typical") if typical is not None else x
    timings: dict[str, float] = {}
    out: dict[str, Any] = {"format": REPORT_FORMAT, "format_version": REPORT_VERSION,
                           "config": asdict(cfg), "n_inputs": int(x.shape[0]),
                           "coder": {"n_latents": coder.n_latents, "d_in": coder.d_in, "d_out": coder.d_out,
                                     "activation": coder.cfg.activation, "skip": bool(coder.cfg.skip),
                                     "k": coder.cfg.k}}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        say(name)
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        return value

    def fid() -> dict[str, Any]:
        res = {"all": fidelity_stats(reference, coder, x)}
        for name, m in groups.items():
            if bool(m.any()):
                res[name] = fidelity_stats(reference, coder, x[m])
        return res

    out["fidelity"] = timed("fidelity", fid)
    out["jacobian"] = timed("jacobian", lambda: jacobian_agreement(reference, coder, x, groups, cfg.n_probes, gen))
    if cfg.spectra_inputs > 0:
        def spec() -> dict[str, Any]:
            pool = typ
            idx = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
            sample = pool[idx[: cfg.spectra_inputs].to(pool.device)]
            return spectra_report(jacobian_spectra(reference, coder, sample), cfg.spectra_top_k)
        out["spectra"] = timed("spectra", spec)
    det_x = detector_x if detector_x is not None else x
    out["datapoints"] = timed("datapoints", lambda: detect_datapoint_features(
        coder, reference, det_x, detector_keys, cfg.datapoints).to_dict())
    out["offdist"] = timed("offdist", lambda: offdistribution_report(
        reference, coder, typ, other_sets, tuple(cfg.noise_scales), cfg.offdist_probes, gen))
    out["masking"] = timed("masking", lambda: detect_gradient_masking(coder, typ, cfg.masking))
    out["timings_s"] = timings
    return json_safe(out)
