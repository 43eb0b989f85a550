"""The optimiser and gradient helpers every member of the engine uses."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mechfaith.training.config import TrainConfig


def make_adam(params: Sequence[torch.nn.Parameter], cfg: TrainConfig, fused: bool = True,
              thresholds: Sequence[torch.nn.Parameter] = ()) -> torch.optim.Adam:
    """Adam with the config's betas and epsilon; ``fused``: the fused kernel where it exists (CUDA,
    and CPU with torch >= 2.4; else the multi-tensor path), otherwise the plain single-tensor one.
    ``thresholds`` (JumpReLU's, among ``params``) get their own group whose learning rate is
    ``cfg.threshold_lr_scale`` times the others' (its ``lr_scale``, which :func:`set_lr` keeps)."""
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    groups: Any = list(params)
    if thresholds and cfg.threshold_lr_scale != 1.0:
        ids = {id(p) for p in thresholds}
        groups = [{"params": [p for p in params if id(p) not in ids]},
                  {"params": list(thresholds), "lr_scale": cfg.threshold_lr_scale,
                   "lr": cfg.lr * cfg.threshold_lr_scale}]
    if not fused:
        return torch.optim.Adam(groups, **kwargs)
    try:
        return torch.optim.Adam(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, foreach=True, **kwargs)


def total_norm(grads: list[Tensor]) -> Tensor:
    """The global L2 norm of a list of gradients (0-dim tensor, no host sync)."""
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0, foreach=True)
    norms = torch._foreach_norm(grads)  # older torch
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_(grads: list[Tensor], max_norm: float, total: Tensor) -> None:
    """Scale the gradients in place so their global norm is at most ``max_norm``."""
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate to ``lr`` (times the group's ``lr_scale``, if any)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def backward_step(total: Tensor, params: Sequence[torch.nn.Parameter], grad_clip: float, sync: Any = None,
                  before_norm: Callable[[], None] | None = None) -> Tensor:
    """Backpropagate ``total``, average the gradients over data-parallel ranks (``sync``), run
    ``before_norm`` (e.g. project unit-norm decoder gradients), clip to ``grad_clip`` (0: off);
    returns the global gradient norm before clipping (no host sync)."""
    total.backward()
    if sync is not None:
        sync.reduce_grads(list(params))
    if before_norm is not None:
        before_norm()
    grads = [p.grad for p in params if p.grad is not None]
    norm = total_norm(grads)
    if grad_clip > 0:
        clip_(grads, grad_clip, norm)
    return norm


def tokens_since_fired(since: Tensor, fired: Tensor, rows: int, sync: Any = None) -> tuple[Tensor, int]:
    """The dead-latent counters after a step of ``rows`` rows in which ``fired`` (bool, like ``since``)
    fired, OR-ed and counted over data-parallel ranks: ``(new counters, rows over all ranks)``."""
    if sync is not None:
        fired = sync.reduce_fired(fired)
        rows = sync.global_rows(rows)
    return torch.where(fired, torch.zeros_like(since), since + rows), rows
