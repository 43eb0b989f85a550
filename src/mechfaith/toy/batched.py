"""A grid of G sparse coders trained at once, as one model with stacked weights.

Every member is an ordinary ReLU coder in the project's layout (see
:class:`mechfaith.coders.SparseCoder`), stacked along a leading grid axis::

    W_enc [G, d_in, n]   b_enc [G, n]   W_dec [G, n, d_out]   b_dec [G, d_out]

    pre   = x W_enc + b_enc      [G, batch, n]      (one batched matmul for the whole grid)
    f     = ReLU(pre)            [G, batch, n]
    y_hat = f W_dec + b_dec      [G, batch, d_out]

Each member has its own hyperparameters (a :class:`MemberSpec`: sparsity penalty and coefficient,
Jacobian-matching coefficient, Jacobian-contribution coefficient, repeat fraction, seed), held as
[G] tensors. The total loss is the sum of the members' losses, and Adam is element-wise, so each
member trains exactly as it would alone; :func:`member_losses` is checked against the single-coder
functions of ``coders.penalties`` and ``training.jacobian_matching`` in the tests.

Per-member loss (means over the batch)::

    ||y_hat - y||^2 + lam_tanh * sum_i tanh(c f_i ||W_dec,i||) + lam_l1 * sum_i f_i ||W_dec,i||
      + jac * ||J_ref(x) v - J_coder(x) v||^2 + jcp * sum_i 1[pre_i > 0] ||W_enc,i|| ||W_dec,i||

``J_ref(x) v`` comes from forward-mode autodiff (``torch.func.jvp``) of the real reference module
(any MLP ``[..., d_in] -> [..., d_out]``); ``J_coder(x) v = ((v W_enc) * 1[pre > 0]) W_dec`` shares
the forward pass, so the term's gradient reaches the coder's parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.errors import ConfigError

Reference = Callable[[Tensor], Tensor]
TRAIN_PENALTIES = ("tanh_l1", "l1")


@dataclass(frozen=True)
class MemberSpec:
    """The hyperparameters of one member of the grid."""

    setting: str  # name of the experiment this member belongs to
    seed: int  # initialisation seed (the data stream is shared by the grid but never the samples)
    repeat_frac: float = 0.0
    penalty: str = "tanh_l1"
    sparsity_coef: float = 0.1
    jacobian_coef: float = 0.0
    jac_contrib_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.penalty not in TRAIN_PENALTIES:
            raise ConfigError(f"MemberSpec.penalty {self.penalty!r} is not one of {', '.join(TRAIN_PENALTIES)}")
        if not 0.0 <= self.repeat_frac <= 1.0:
            raise ConfigError(f"MemberSpec.repeat_frac must be in [0, 1], got {self.repeat_frac}")
        for name in ("sparsity_coef", "jacobian_coef", "jac_contrib_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"MemberSpec.{name} must be >= 0, got {getattr(self, name)}")


class BatchedCoder(nn.Module):
    """G ReLU coders with stacked weights (see the module docstring for shapes)."""

    def __init__(self, n_members: int, d_in: int, n_latents: int, d_out: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(torch.zeros(n_members, d_in, n_latents, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_members, n_latents, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(n_members, n_latents, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(n_members, d_out, dtype=dtype))

    @property
    def n_members(self) -> int:
        return self.W_enc.shape[0]

    @classmethod
    def from_coders(cls, coders: Sequence[SparseCoder]) -> "BatchedCoder":
        """Stack plain ReLU coders without skip (same shapes) into one grid."""
        if not coders:
            raise ConfigError("BatchedCoder.from_coders: no coders given")
        first = coders[0]
        for c in coders:
            if c.cfg.activation != "relu" or c.W_skip is not None:
                raise ConfigError("BatchedCoder holds ReLU coders without skip connections only")
            if c.W_enc.shape != first.W_enc.shape or c.W_dec.shape != first.W_dec.shape:
                raise ConfigError("BatchedCoder.from_coders: coders of different shapes")
        out = cls(len(coders), first.d_in, first.n_latents, first.d_out, dtype=first.W_enc.dtype)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(out, name).copy_(torch.stack([getattr(c, name).detach() for c in coders]))
        return out

    @classmethod
    def initialised(cls, cfg: CoderConfig, seeds: Sequence[int]) -> "BatchedCoder":
        """Member g initialised exactly as ``SparseCoder(cfg)`` with a generator seeded ``seeds[g]``."""
        coders = [SparseCoder(cfg, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return cls.from_coders(coders)

    def member(self, g: int, cfg: CoderConfig | None = None) -> SparseCoder:
        """Member ``g`` as a regular :class:`SparseCoder` (a copy; ReLU, no skip, decoder_norm 'penalty')."""
        if not -self.n_members <= g < self.n_members:
            raise IndexError(f"member {g} out of range for a grid of {self.n_members}")
        d_in, n = self.W_enc.shape[1:]
        d_out = self.W_dec.shape[2]
        cfg = cfg or CoderConfig(d_in=d_in, n_latents=n, d_out=d_out, activation="relu",
                                 decoder_norm="penalty")
        coder = SparseCoder(cfg, dtype=self.W_enc.dtype)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(coder, name).copy_(getattr(self, name)[g])
        return coder

    def forward_full(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(y_hat [G, B, d_out], f [G, B, n], pre [G, B, n])`` for inputs x [G, B, d_in]."""
        pre = torch.baddbmm(self.b_enc.unsqueeze(1), x, self.W_enc)
        f = torch.relu(pre)
        y_hat = torch.baddbmm(self.b_dec.unsqueeze(1), f, self.W_dec)
        return y_hat, f, pre


@dataclass
class GridHyper:
    """The members' hyperparameters as [G] tensors (built from specs by :func:`grid_hyper`)."""

    lam_tanh: Tensor
    lam_l1: Tensor
    jacobian: Tensor
    jac_contrib: Tensor
    repeat_frac: Tensor
    tanh_c: float = 4.0

    @property
    def jacobian_members(self) -> Tensor:
        """Indices of the members whose Jacobian term is on."""
        return torch.nonzero(self.jacobian > 0).flatten()


def grid_hyper(specs: Sequence[MemberSpec], tanh_c: float = 4.0) -> GridHyper:
    """Hyperparameter tensors [G] from member specs."""
    t = lambda vals: torch.tensor(list(vals), dtype=torch.float64)  # noqa: E731  (cast at use)
    return GridHyper(
        lam_tanh=t(s.sparsity_coef if s.penalty == "tanh_l1" else 0.0 for s in specs),
        lam_l1=t(s.sparsity_coef if s.penalty == "l1" else 0.0 for s in specs),
        jacobian=t(s.jacobian_coef for s in specs),
        jac_contrib=t(s.jac_contrib_coef for s in specs),
        repeat_frac=t(s.repeat_frac for s in specs),
        tanh_c=tanh_c,
    )


def reference_jvp(reference: Reference, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(reference(x), J_ref(x) v)`` by forward-mode autodiff of the module, without a graph.

    Works on any leading shape (the grid's [G', B, d] included); no gradient reaches the reference.
    """
    with torch.no_grad():
        return torch.func.jvp(reference, (x,), (v,))


def member_losses(coder: BatchedCoder, reference: Reference, x: Tensor, hyper: GridHyper,
                  v: Tensor | None = None, y: Tensor | None = None,
                  sparsity_scale: float = 1.0) -> dict[str, Tensor]:
    """Per-member loss terms, each [G], for inputs x [G, B, d_in] (targets ``reference(x)``).

    ``v`` [G, B, d_in] or [n_probes, G, B, d_in] are the Jacobian probes (needed when any member
    has a Jacobian term; only the members with a nonzero coefficient pay for each term). Returns the keys ``mse``, ``tanh_l1``,
    ``l1``, ``jacobian``, ``jac_contrib``, ``sparsity`` (the weighted penalty, times ``sparsity_scale``,
    the warm-up factor), ``total``, and
    ``fired`` [G, n] (how many inputs of the batch each latent fired on; not a loss).
    """
    if y is None:
        with torch.no_grad():
            y = reference(x)
    y_hat, f, pre = coder.forward_full(x)
    mse = (y_hat - y).pow(2).sum(-1).mean(-1)  # [G]
    norms = coder.W_dec.norm(dim=-1)  # [G, n]
    zero = torch.zeros_like(mse)
    # Each term is computed only for the members that use it (elementwise [G, B, n] work dominates).
    # l1 = mean_b sum_i f_i ||W_dec,i|| = mean_b (f @ norms): a matmul, no [G, B, n] temporary
    l1 = torch.bmm(f, norms.unsqueeze(-1)).squeeze(-1).mean(-1) if bool((hyper.lam_l1 > 0).any()) else zero
    tanh = zero
    idx_t = torch.nonzero(hyper.lam_tanh > 0).flatten()
    if idx_t.numel() == mse.numel():
        tanh = torch.tanh(f * (hyper.tanh_c * norms).unsqueeze(1)).sum(-1).mean(-1)
    elif idx_t.numel():
        part = torch.tanh(f[idx_t] * (hyper.tanh_c * norms[idx_t]).unsqueeze(1)).sum(-1).mean(-1)
        tanh = zero.index_put((idx_t,), part)
    idx = hyper.jacobian_members
    need_jcp = bool((hyper.jac_contrib > 0).any())
    mask = (pre > 0).to(f.dtype) if (need_jcp or idx.numel()) else None
    jcp = zero
    if need_jcp:
        weight = coder.W_enc.norm(dim=1) * norms  # [G, n]  ||W_enc[:, i]|| ||W_dec[i]||
        jcp = torch.bmm(mask, weight.unsqueeze(-1)).squeeze(-1).mean(-1)
    jac = zero
    if idx.numel():
        if v is None:
            raise ConfigError("member_losses: Jacobian probes v are needed for the Jacobian term")
        probes = v if v.ndim == 4 else v.unsqueeze(0)  # [P, G, B, d_in]
        xs, m = x[idx], mask[idx]
        W_enc, W_dec = coder.W_enc[idx], coder.W_dec[idx]
        per_probe = []
        for vp in probes:  # a few probes; each costs one forward-mode pass and two small matmuls
            vs = vp[idx]
            _, ref_jv = reference_jvp(reference, xs, vs)
            coder_jv = torch.bmm(torch.bmm(vs, W_enc) * m, W_dec)  # [G', B, d_out]
            per_probe.append((coder_jv - ref_jv).pow(2).sum(-1).mean(-1))
        jac = zero.index_put((idx,), torch.stack(per_probe).mean(0))
    h = {k: getattr(hyper, k).to(mse.dtype) for k in ("lam_tanh", "lam_l1", "jacobian", "jac_contrib")}
    sparsity = sparsity_scale * (h["lam_tanh"] * tanh + h["lam_l1"] * l1)
    total = mse + sparsity + h["jacobian"] * jac + h["jac_contrib"] * jcp
    return {"mse": mse, "tanh_l1": tanh, "l1": l1, "jacobian": jac, "jac_contrib": jcp,
            "sparsity": sparsity, "total": total,
            "fired": (f.detach() > 0).sum(dim=1)}  # [G, n] firings per latent in this batch (no grad)


def lr_at(step: int, steps: int, lr: float, warmup: int, decay_frac: float) -> float:
    """Learning rate: linear warm-up over ``warmup`` steps, constant, then a cosine decay to 0 over
    the last ``decay_frac`` of the steps."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    start = int(steps * (1 - decay_frac))
    if decay_frac <= 0 or step < start:
        return lr
    u = (step - start) / max(1, steps - start)
    return lr * 0.5 * (1 + math.cos(math.pi * u))
