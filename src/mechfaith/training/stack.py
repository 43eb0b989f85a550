"""K coders of one architecture stacked along a first axis, computed as one batched model.

A stack holds K ReLU or TopK coders (SAEs or transcoders, no skip) whose widths and k may differ;
member i is an ordinary :class:`~mechfaith.coders.SparseCoder` of its own configuration
(``member_cfgs[i]``), padded to the widest member::

    W_enc [K, d_in, n]   b_enc [K, n]   W_dec [K, n, d_out]   b_dec [K, d_out]
    width_mask [K, n]    (latents beyond a member's width never fire and never change)
    k_mask [K, k_max]    (TopK member i keeps its k_i largest of the k_max selected)

Inputs are shared (x [B, d_in], a sweep from one batch) or per member (x [K, B, d_in]: the toy's
members see different data). :class:`StackSettings` holds what else differs per member (sparsity,
Jacobian-matching and Jacobian-contribution coefficients) as [K] tensors. :func:`stack_losses`
computes every member's loss terms at once; the members are independent (disjoint parameters,
elementwise Adam), so member i trains as it would alone, which the tests check against
:class:`~mechfaith.training.trainer.Trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.sparse_decode import StackedSparseTopKFn
from mechfaith.configs import doc
from mechfaith.errors import ConfigError

STACK_ACTIVATIONS = ("relu", "topk")
STACK_PENALTIES = ("none", "l1", "tanh_l1")


@dataclass
class StackMember:
    """One member of a stack: what differs from the stack's base coder and training configs."""

    n_latents: int | None = doc("Width of this member (None: the base config's n_latents).", None)
    k: int | None = doc("k of this TopK member (None: the base config's k).", None)
    sparsity: str | None = doc("Sparsity penalty: none, l1 or tanh_l1 (None: the TrainConfig's).", None)
    sparsity_coef: float | None = doc("Sparsity coefficient (None: the TrainConfig's).", None)
    jacobian_coef: float | None = doc("Jacobian-matching coefficient (None: the TrainConfig's).", None)
    jacobian_contribution_coef: float | None = doc("Jacobian-contribution coefficient (None: the "
                                                   "TrainConfig's).", None)
    seed: int | None = doc("Initialisation seed (None: the stack's seed + the member's index).", None)


def member_configs(base: CoderConfig, members: Sequence[StackMember]) -> list[CoderConfig]:
    """Each member's coder configuration (validated against the base)."""
    if base.activation not in STACK_ACTIVATIONS:
        raise ConfigError(f"a stack holds relu or topk coders, not {base.activation!r}")
    if base.skip:
        raise ConfigError("a stack does not support skip connections")
    if not members:
        raise ConfigError("a stack needs at least one member")
    cfgs = []
    for i, m in enumerate(members):
        width = m.n_latents if m.n_latents is not None else base.n_latents
        k = m.k if m.k is not None else base.k
        if not 0 < width <= base.n_latents:
            raise ConfigError(f"stack member {i}: width {width} must be in 1..{base.n_latents} (the base n_latents)")
        if base.activation == "topk" and not 0 < k <= width:
            raise ConfigError(f"stack member {i}: k = {k} must be in 1..{width} (its width)")
        cfgs.append(replace(base, n_latents=width, k=k))
    return cfgs


class CoderStack(nn.Module):
    """K coders of one architecture with stacked weights (see the module docstring for shapes)."""

    width_mask: Tensor  # buffers (register_buffer in __init__)
    k_mask: Tensor

    def __init__(self, member_cfgs: Sequence[CoderConfig], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not member_cfgs:
            raise ConfigError("a stack needs at least one member")
        first = member_cfgs[0]
        for c in member_cfgs:
            if c.activation not in STACK_ACTIVATIONS or c.skip:
                raise ConfigError("a stack holds relu or topk coders without skip connections")
            if (c.d_in, c.d_out, c.kind, c.activation, c.decoder_norm) != (
                    first.d_in, first.d_out, first.kind, first.activation, first.decoder_norm):
                raise ConfigError("the members of a stack must share d_in, d_out, kind, activation "
                                  "and decoder_norm")
        self.member_cfgs = list(member_cfgs)
        K, d_in, d_out = len(member_cfgs), first.d_in, int(first.d_out)  # type: ignore[arg-type]
        n = max(c.n_latents for c in member_cfgs)
        self.activation = first.activation
        self.kind = first.kind
        self.decoder_norm = first.decoder_norm
        self.W_enc = nn.Parameter(torch.zeros(K, d_in, n, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(K, n, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(K, n, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(K, d_out, dtype=dtype))
        widths = torch.tensor([c.n_latents for c in member_cfgs])
        self.full_width = bool((widths == n).all())
        self.register_buffer("width_mask", (torch.arange(n)[None, :] < widths[:, None]).to(dtype))  # [K, n]
        ks = torch.tensor([c.k for c in member_cfgs])
        self.k_max = int(ks.max())
        self.register_buffer("k_mask", (torch.arange(self.k_max)[None, :] < ks[:, None]).to(dtype))  # [K, k_max]

    @property
    def n_members(self) -> int:
        return self.W_enc.shape[0]

    @classmethod
    def initialised(cls, member_cfgs: Sequence[CoderConfig], seeds: Sequence[int]) -> "CoderStack":
        """Member i initialised exactly as ``SparseCoder(member_cfgs[i])`` seeded ``seeds[i]``."""
        if len(seeds) != len(member_cfgs):
            raise ConfigError("CoderStack.initialised: one seed per member")
        coders = [SparseCoder(c, generator=torch.Generator().manual_seed(int(s)))
                  for c, s in zip(member_cfgs, seeds)]
        return cls.from_coders(coders)

    @classmethod
    def from_members(cls, base: CoderConfig, members: Sequence[StackMember], seed: int = 0) -> "CoderStack":
        """Member i of its own width and k (:func:`member_configs`), seeded ``members[i].seed`` or
        ``seed + i``."""
        seeds = [m.seed if m.seed is not None else seed + i for i, m in enumerate(members)]
        return cls.initialised(member_configs(base, members), seeds)

    @classmethod
    def from_coders(cls, coders: Sequence[SparseCoder]) -> "CoderStack":
        """Stack coders (copies of their weights; widths may differ)."""
        if not coders:
            raise ConfigError("CoderStack.from_coders: no coders given")
        out = cls([c.cfg for c in coders], dtype=coders[0].W_enc.dtype)
        with torch.no_grad():
            for i, c in enumerate(coders):
                w = c.n_latents
                out.W_enc[i, :, :w] = c.W_enc
                out.b_enc[i, :w] = c.b_enc
                out.W_dec[i, :w] = c.W_dec
                out.b_dec[i] = c.b_dec
        return out

    @torch.no_grad()
    def member_coder(self, i: int) -> SparseCoder:
        """Member ``i`` as a standalone :class:`SparseCoder` of its own width (a copy)."""
        if not -self.n_members <= i < self.n_members:
            raise IndexError(f"member {i} out of range for a stack of {self.n_members}")
        mcfg = self.member_cfgs[i]
        w = mcfg.n_latents
        coder = SparseCoder(mcfg, dtype=self.W_enc.dtype).to(self.W_enc.device)
        coder.W_enc.copy_(self.W_enc[i, :, :w])
        coder.b_enc.copy_(self.b_enc[i, :w])
        coder.W_dec.copy_(self.W_dec[i, :w])
        coder.b_dec.copy_(self.b_dec[i])
        return coder

    def expand_input(self, x: Tensor) -> Tensor:
        """x [B, d_in] (shared) or [K, B, d_in] -> [K, B, d_in]."""
        if x.ndim == 2:
            return x.unsqueeze(0).expand(self.n_members, *x.shape)
        return x

    def forward_dense(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(y_hat [K, B, d_out], f [K, B, n], pre [K, B, n])`` for x [B, d_in] or [K, B, d_in]."""
        xs = self.expand_input(x)
        pre = torch.baddbmm(self.b_enc.unsqueeze(1), xs, self.W_enc)
        if self.activation == "relu":
            f = torch.relu(pre)
            if not self.full_width:
                f = f * self.width_mask.unsqueeze(1).to(f.dtype)
        else:
            masked = pre if self.full_width else pre.masked_fill(self.width_mask.unsqueeze(1) == 0, float("-inf"))
            vals, idx = masked.topk(self.k_max, dim=-1, sorted=True)  # [K, B, k_max]
            vals = torch.relu(vals) * self.k_mask.unsqueeze(1).to(vals.dtype)
            f = torch.zeros_like(pre).scatter(-1, idx, vals)
        y_hat = torch.baddbmm(self.b_dec.unsqueeze(1), f, self.W_dec)
        return y_hat, f, pre

    def forward_sparse_topk(self, x: Tensor, bf16: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """TopK members from a shared batch x [B, d_in] by sparse products (training path):
        ``(y_hat [K, B, d_out], latent_sums [K, n], fired [K, n] counts)``."""
        K, n = self.n_members, self.W_enc.shape[2]
        with torch.autocast(x.device.type, enabled=False):  # mixed precision inside, by hand
            y_hat, act, col, _ = StackedSparseTopKFn.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                                            self.k_mask, self.width_mask, bf16)
        sums = torch.zeros(K * n, dtype=act.dtype, device=act.device).index_add(0, col, act).view(K, n)
        fired = torch.zeros(K * n, dtype=torch.long, device=act.device).index_add(
            0, col, (act.detach() > 0).to(torch.long)).view(K, n)
        return y_hat, sums, fired

    def decoder_norms(self) -> Tensor:
        """[K, n]."""
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        norms = self.W_dec.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(torch.where(norms > 0, self.W_dec / norms.clamp_min(1e-12), self.W_dec))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        g -= (g * w).sum(dim=-1, keepdim=True) * w


@dataclass
class StackSettings:
    """The members' loss coefficients as [K] float64 tensors (cast at use)."""

    lam_tanh: Tensor
    lam_l1: Tensor
    jacobian: Tensor
    jac_contrib: Tensor
    tanh_c: float = 4.0

    @property
    def jacobian_members(self) -> Tensor:
        """Indices of the members whose Jacobian term is on."""
        return torch.nonzero(self.jacobian > 0).flatten()

    @classmethod
    def build(cls, sparsity: Sequence[str], sparsity_coef: Sequence[float], jacobian_coef: Sequence[float],
              jac_contrib_coef: Sequence[float], tanh_c: float) -> "StackSettings":
        for s in sparsity:
            if s not in STACK_PENALTIES:
                raise ConfigError(f"a stack's sparsity penalty must be one of {', '.join(STACK_PENALTIES)}, got {s!r}")
        for name, vals in (("sparsity_coef", sparsity_coef), ("jacobian_coef", jacobian_coef),
                           ("jacobian_contribution_coef", jac_contrib_coef)):
            if any(not v >= 0 or v == float("inf") for v in vals):
                raise ConfigError(f"stack members' {name} must be finite and >= 0, got {list(vals)}")
        t = lambda vals: torch.tensor(list(vals), dtype=torch.float64)
        return cls(lam_tanh=t(c if s == "tanh_l1" else 0.0 for s, c in zip(sparsity, sparsity_coef)),
                   lam_l1=t(c if s == "l1" else 0.0 for s, c in zip(sparsity, sparsity_coef)),
                   jacobian=t(jacobian_coef), jac_contrib=t(jac_contrib_coef), tanh_c=tanh_c)
