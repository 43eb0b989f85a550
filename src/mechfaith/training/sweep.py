"""Training many coders at once from one activation stream: a sweep as one batched model.

A sweep over sparsity coefficients, widths or k trains K coders on the same data. Run one after
another, each run pays for its own stream of activations (a model's forward pass, or reading
and shuffling a cache) and its own per-step overheads; here the K coders are stacked into one
module (weights [K, d_in, n], [K, n, d_out]) and every batch is read once and used by all of them.

- Per-member settings (:class:`SweepMember`): the sparsity coefficient (L1 penalty, ReLU coders),
  the width (latents beyond a member's width are masked off: they never fire and never change)
  and k (TopK coders: the member keeps its k largest of the ``k_max`` selected).
- The members are independent: the loss is the sum of the members' losses (their parameters are
  disjoint, so each gets exactly its own gradient), Adam is elementwise, and gradient clipping is
  per member. Member i trains exactly as ``Trainer`` would train it alone with the same init, data
  and options (without AuxK, which the sweep does not support), which a test checks.
- ``mixed_precision="bf16"`` runs the forward (and so the backward's matmuls) under bfloat16
  autocast where the device supports it (CUDA with bf16, CPUs with AVX-512 BF16 / AMX); weights,
  Adam and the loss stay float32.
- :meth:`CoderSweep.member_coder` exports member i as a :class:`SparseCoder` of its own width
  (save it with ``coders.files.save_coder``).

Shapes: x [B, d_in] (shared), pre/f [K, B, n], y_hat [K, B, d_out].
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechfaith.coders.coder import SparseCoder
from mechfaith.coders.config import CoderConfig
from mechfaith.coders.sparse_decode import StackedSparseTopKFn
from mechfaith.configs import doc
from mechfaith.errors import ConfigError, InputError, TrainingDiverged
from mechfaith.training.config import TrainConfig
from mechfaith.training.schedules import lr_at, sparsity_coef_at
from mechfaith.training.streams import as_stream

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16")


@dataclass
class SweepMember:
    """One coder of a sweep: what differs from the sweep's base configuration."""

    sparsity_coef: float | None = doc("L1 coefficient of this member (None: the TrainConfig's).", None)
    n_latents: int | None = doc("Width of this member (None: the base config's n_latents, the widest).", None)
    k: int | None = doc("k of this TopK member (None: the base config's k).", None)


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bfloat16 matmuls run natively on ``device`` (CUDA with bf16; CPU with AVX-512 BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text(errors="ignore")
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


class CoderSweep(nn.Module):
    """K coders of one architecture (ReLU or TopK; SAE or transcoder) stacked along a first dim."""

    def __init__(self, cfg: CoderConfig, members: list[SweepMember], *, seed: int = 0) -> None:
        super().__init__()
        if cfg.activation not in ("relu", "topk"):
            raise ConfigError(f"a sweep trains relu or topk coders, not {cfg.activation!r}")
        if cfg.skip:
            raise ConfigError("a sweep does not support skip connections")
        if not members:
            raise ConfigError("a sweep needs at least one member")
        self.cfg = cfg
        self.members = list(members)
        K, d_in, n, d_out = len(members), cfg.d_in, cfg.n_latents, int(cfg.d_out)  # type: ignore[arg-type]
        self.member_cfgs: list[CoderConfig] = []
        for i, m in enumerate(members):
            width = m.n_latents if m.n_latents is not None else n
            k = m.k if m.k is not None else cfg.k
            if not 0 < width <= n:
                raise ConfigError(f"sweep member {i}: width {width} must be in 1..{n} (the base n_latents)")
            if cfg.activation == "topk" and not 0 < k <= width:
                raise ConfigError(f"sweep member {i}: k = {k} must be in 1..{width} (its width)")
            self.member_cfgs.append(replace(cfg, n_latents=width, k=k))
        self.W_enc = nn.Parameter(torch.zeros(K, d_in, n))
        self.b_enc = nn.Parameter(torch.zeros(K, n))
        self.W_dec = nn.Parameter(torch.zeros(K, n, d_out))
        self.b_dec = nn.Parameter(torch.zeros(K, d_out))
        widths = torch.tensor([c.n_latents for c in self.member_cfgs])
        self.register_buffer("width_mask", (torch.arange(n)[None, :] < widths[:, None]).float())  # [K, n]
        ks = torch.tensor([c.k for c in self.member_cfgs])
        self.k_max = int(ks.max())
        self.register_buffer("k_mask", (torch.arange(self.k_max)[None, :] < ks[:, None]).float())  # [K, k_max]
        with torch.no_grad():  # member i starts as SparseCoder(member_cfgs[i]) seeded seed + i
            for i, mcfg in enumerate(self.member_cfgs):
                one = SparseCoder(mcfg, generator=torch.Generator().manual_seed(seed + i))
                w = mcfg.n_latents
                self.W_enc[i, :, :w] = one.W_enc
                self.W_dec[i, :w] = one.W_dec

    @property
    def n_members(self) -> int:
        return self.W_enc.shape[0]

    def forward_full(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(y_hat [K, B, d_out], latent_sums [K, n], l0 [K])`` for a shared batch x [B, d_in].

        ``latent_sums``: each latent's activations summed over the batch (differentiable, for the
        L1 penalty); ``l0``: active latents per row, averaged over the batch (no gradient).
        TopK members with gradients on take the sparse path (:class:`StackedSparseTopKFn`).
        """
        K, B = self.n_members, x.shape[0]
        if self.cfg.activation == "topk" and torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64):
            bf16 = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.bfloat16
            with torch.autocast(x.device.type, enabled=False):  # mixed precision inside, by hand
                y_hat, act, col, _ = StackedSparseTopKFn.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                                                self.k_mask, self.width_mask, bf16)
            n = self.W_enc.shape[2]
            sums = torch.zeros(K * n, dtype=act.dtype, device=act.device).index_add(0, col, act).view(K, n)
            member = torch.div(col, n, rounding_mode="floor")
            l0 = torch.bincount(member, weights=(act.detach() > 0).to(torch.float32), minlength=K) / B
            return y_hat, sums, l0
        pre = torch.baddbmm(self.b_enc.unsqueeze(1), x.unsqueeze(0).expand(K, B, x.shape[1]), self.W_enc)
        if self.cfg.activation == "relu":
            f = torch.relu(pre) * self.width_mask.unsqueeze(1).to(pre.dtype)
        else:
            masked = pre.masked_fill(self.width_mask.unsqueeze(1) == 0, float("-inf"))
            vals, idx = masked.topk(self.k_max, dim=-1, sorted=True)  # [K, B, k_max]
            vals = torch.relu(vals) * self.k_mask.unsqueeze(1).to(vals.dtype)
            f = torch.zeros_like(pre).scatter(-1, idx, vals)
        y_hat = torch.baddbmm(self.b_dec.unsqueeze(1), f, self.W_dec)
        l0 = (f.detach() > 0).sum(dim=(1, 2)).to(torch.float32) / B
        return y_hat, f.sum(dim=1), l0

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

    @torch.no_grad()
    def member_coder(self, i: int) -> SparseCoder:
        """Member ``i`` as a standalone :class:`SparseCoder` of its own width (a copy, on CPU)."""
        mcfg = self.member_cfgs[i]
        w = mcfg.n_latents
        coder = SparseCoder(mcfg)
        coder.W_enc.copy_(self.W_enc[i, :, :w])
        coder.b_enc.copy_(self.b_enc[i, :w])
        coder.W_dec.copy_(self.W_dec[i, :w])
        coder.b_dec.copy_(self.b_dec[i])
        return coder


class SweepTrainer:
    """Adam on a :class:`CoderSweep` from one stream of ``(x, y)`` batches.

    Uses from ``cfg``: n_steps, lr and its schedule, Adam's betas/eps, sparsity ('l1' or 'none')
    with its warm-up, sparsity_coef (the default of members without their own), grad_clip (per
    member), log_every, device. Not supported: Jacobian terms, AuxK, checkpoints (export members
    with :meth:`CoderSweep.member_coder`). ``y = None`` in a batch means ``y = x`` (SAEs).
    """

    def __init__(self, sweep: CoderSweep, cfg: TrainConfig, *, log_path: str | Path | None = None,
                 mixed_precision: str = "no", progress: bool = True) -> None:
        if cfg.sparsity not in ("l1", "none"):
            raise ConfigError(f"a sweep supports the l1 penalty or none, not {cfg.sparsity!r}")
        if cfg.jacobian_coef > 0 or cfg.jacobian_contribution_coef > 0:
            raise ConfigError("a sweep does not support Jacobian terms")
        if mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        self.device = torch.device(cfg.device)
        self.sweep = sweep.to(self.device)
        self.cfg = cfg
        self.autocast = mixed_precision == "bf16"
        if self.autocast and not bf16_supported(self.device):
            log.warning("bf16 is not native on %s; training in float32", self.device)
            self.autocast = False
        coefs = [m.sparsity_coef if m.sparsity_coef is not None else cfg.sparsity_coef for m in sweep.members]
        self.coefs = torch.tensor(coefs, dtype=torch.float32, device=self.device)  # [K]
        self.params = [sweep.W_enc, sweep.b_enc, sweep.W_dec, sweep.b_dec]
        kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        try:
            self.optimizer = torch.optim.Adam(self.params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.Adam(self.params, foreach=True, **kwargs)
        self.unit = sweep.cfg.decoder_norm == "unit"
        self.step_count = 0
        self.tokens_seen = 0
        self.log_path = Path(log_path) if log_path is not None else None
        self.progress = progress
        if self.unit:
            sweep.normalize_decoder_()

    def _losses(self, x: Tensor, y: Tensor, coef_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(total, recon [K], sparsity [K], l0 [K])."""
        B = x.shape[0]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            y_hat, sums, l0 = self.sweep.forward_full(x)
        y_hat, sums = y_hat.float(), sums.float()
        recon = (y_hat - y.unsqueeze(0)).square().sum(dim=(1, 2)) / B  # [K]
        if self.cfg.sparsity == "l1" and self.cfg.sparsity_coef > 0:
            sparsity = (sums * self.sweep.decoder_norms()).sum(dim=-1) / B  # [K]
            total = (recon + coef_scale * self.coefs * sparsity).sum()
        else:
            sparsity = torch.zeros_like(recon)
            total = recon.sum()
        return total, recon, sparsity, l0

    def step(self, x: Tensor, y: Tensor | None = None) -> dict[str, Any]:
        """One Adam step of every member on the batch; per-member metrics as lists of K floats."""
        cfg, sweep = self.cfg, self.sweep
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != sweep.cfg.d_in:
            raise InputError(f"sweep batch x must be [batch, {sweep.cfg.d_in}]")
        x = x.to(self.device, torch.float32)
        y = x if y is None else y.to(self.device, torch.float32)
        index = self.step_count
        lr = lr_at(index, cfg)
        scale = sparsity_coef_at(index, cfg) / cfg.sparsity_coef if cfg.sparsity_coef > 0 else 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total, recon, sparsity, l0 = self._losses(x, y, scale)
        total.backward()
        if self.unit:
            sweep.remove_parallel_decoder_grad_()
        # per-member gradient norms [K]
        sq = sum(p.grad.square().reshape(p.shape[0], -1).sum(dim=1) for p in self.params)  # type: ignore[union-attr]
        norms = sq.sqrt()
        if cfg.grad_clip > 0:
            c = (cfg.grad_clip / (norms + 1e-6)).clamp(max=1.0)
            for p in self.params:
                p.grad.mul_(c.view(-1, *([1] * (p.ndim - 1))))  # type: ignore[union-attr]
        with torch.no_grad():
            var = (y - y.mean(dim=0)).square().sum().clamp_min(1e-30)
            stats = torch.stack([recon.detach(), sparsity.detach(), norms,
                                 1 - recon.detach() * x.shape[0] / var, l0]).double()
            values = stats.tolist()  # the one host sync
        if not all(math.isfinite(v) for v in values[0] + values[2]):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"sweep diverged at step {index + 1}; no update was made")
        self.optimizer.step()
        if self.unit:
            sweep.normalize_decoder_()
        self.step_count += 1
        self.tokens_seen += x.shape[0]
        return {"step": self.step_count, "tokens": self.tokens_seen, "lr": lr, "recon": values[0],
                "sparsity": values[1], "grad_norm": values[2], "fve": values[3], "l0": values[4]}

    def fit(self, stream: Any) -> list[dict[str, Any]]:
        """Train until ``cfg.n_steps`` or the stream ends; returns the log records (also JSONL)."""
        src = as_stream(stream)
        records: list[dict[str, Any]] = []
        fh = open(self.log_path, "a", encoding="utf-8") if self.log_path is not None else None
        bar = tqdm(total=self.cfg.n_steps, initial=self.step_count, disable=not self.progress,
                   desc="sweep", unit="step", file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            while self.step_count < self.cfg.n_steps:
                try:
                    x, y = src.next_batch()
                except StopIteration:
                    log.warning("the stream ended after %d of %d steps", self.step_count, self.cfg.n_steps)
                    break
                rec = self.step(x, y)
                bar.update(1)
                done = self.step_count
                if done == 1 or done % self.cfg.log_every == 0 or done == self.cfg.n_steps:
                    rec["elapsed"] = round(time.perf_counter() - t0, 3)
                    records.append(rec)
                    if fh is not None:
                        fh.write(json.dumps(rec) + "\n")
                        fh.flush()
        finally:
            bar.close()
            if fh is not None:
                fh.close()
        return records
