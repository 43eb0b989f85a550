"""Sparsity penalties, selectable by name. Each returns the mean over the batch of a sum over latents.

- ``none``:    0
- ``l1``:      lambda * sum_i f_i ||W_dec,i||
- ``tanh_l1``: lambda * sum_i tanh(c * f_i ||W_dec,i||)   (closer to L0; c = 4 is a common default)
- ``l0``:      lambda * sum_i H(pre_i - theta_i)           (JumpReLU; straight-through to theta)

and the per-feature Jacobian-contribution penalty proposed in "A Toy Model of Mechanistic
(Un)Faithfulness": ``sum_i 1[pre_i > 0] ||W_enc,i|| ||W_dec,i||``, an upper bound on the L1 of
feature i's contribution to the Jacobian, which discourages large-weight "gradient-masking" features.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mechfaith.coders import activations as acts
from mechfaith.coders.coder import CoderOutput, SparseCoder
from mechfaith.errors import ConfigError

PenaltyFn = Callable[[SparseCoder, CoderOutput, float], Tensor]


def _none(coder: SparseCoder, out: CoderOutput, c: float) -> Tensor:
    return out.f.new_zeros(())


def _l1(coder: SparseCoder, out: CoderOutput, c: float) -> Tensor:
    # mean_b sum_i f_bi ||W_dec,i|| == (sum_b f_b) . norms / B: no [batch, n] temporary, and the
    # gradient reaching f is an expanded (stride-0) row, never a materialised [batch, n] outer product
    return (out.f.sum(dim=0) @ coder.decoder_norms()) / out.f.shape[0]


def _tanh_l1(coder: SparseCoder, out: CoderOutput, c: float) -> Tensor:
    return torch.tanh(c * (out.f * coder.decoder_norms())).sum(dim=-1).mean()


def _l0(coder: SparseCoder, out: CoderOutput, c: float) -> Tensor:
    if coder.log_threshold is None:
        raise ConfigError("the l0 penalty needs a JumpReLU coder (activation = 'jumprelu')")
    return acts.step(out.pre, coder.threshold(), coder.cfg.jumprelu_bandwidth).sum(dim=-1).mean()


PENALTIES: dict[str, PenaltyFn] = {"none": _none, "l1": _l1, "tanh_l1": _tanh_l1, "l0": _l0}


def sparsity_penalty(name: str, coder: SparseCoder, out: CoderOutput, c: float = 4.0) -> Tensor:
    """The unweighted sparsity penalty ``name`` (multiply by the coefficient lambda yourself)."""
    try:
        fn = PENALTIES[name]
    except KeyError:
        raise ConfigError(f"unknown sparsity penalty {name!r}; choose one of {', '.join(PENALTIES)}") from None
    return fn(coder, out, c)


def jacobian_contribution_penalty(coder: SparseCoder, out: CoderOutput) -> Tensor:
    """``mean_batch sum_i 1[pre_i > 0] ||W_enc[:, i]|| ||W_dec[i]||`` (gradient to the weights only)."""
    weight = coder.W_enc.norm(dim=0) * coder.decoder_norms()  # [n_latents]
    return (out.mask.to(weight.dtype) @ weight).mean()
