"""Training a grid of toy coders at once (one :class:`BatchedCoder`, one optimizer, one loop)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from mechfaith.coders import CoderConfig
from mechfaith.errors import ConfigError, TrainingDiverged
from mechfaith.toy.batched import BatchedCoder, MemberSpec, grid_hyper, lr_at, member_losses
from mechfaith.toy.data import sample_with_repeats
from mechfaith.toy.model import AbsMLP

log = logging.getLogger(__name__)


@dataclass
class GridResult:
    """A trained grid and how its training went."""

    coder: BatchedCoder
    specs: list[MemberSpec]
    final_losses: dict[str, list[float]]  # per-member loss terms averaged over the last steps
    seconds: float
    n_resampled: list[int]  # dead latents re-initialised, per member


def train_grid(specs: Sequence[MemberSpec], mlp: AbsMLP, p: torch.Tensor, *, n_latents: int,
               density: float, steps: int, batch: int, lr: float, tanh_c: float = 4.0,
               n_probes: int = 1, warmup: int = 100, decay_frac: float = 0.2,
               sparsity_warmup_frac: float = 0.2, resample_every: int = 250,
               resample_until_frac: float = 0.6, dead_rate: float = 1e-3, data_seed: int = 0,
               progress: bool = True, desc: str = "toy grid") -> GridResult:
    """Train one coder per spec (all together) on ``abs`` data with the specs' repeat fractions.

    Schedule: Adam, linear lr warm-up over ``warmup`` steps and a cosine decay over the last
    ``decay_frac``; the sparsity coefficients ramp from 0 over the first ``sparsity_warmup_frac`` of
    the steps; latents that fired on fewer than ``dead_rate`` of the inputs since the last check
    are resampled every ``resample_every`` steps during the first ``resample_until_frac``.
    """
    if not specs:
        raise ConfigError("train_grid: no members")
    if steps <= 0 or batch <= 0 or lr <= 0 or n_probes <= 0:
        raise ConfigError("train_grid: steps, batch, lr and n_probes must be positive")
    d = mlp.d
    # unit-norm initial rows: the regime in ToyConfig (lr, steps, resampling) was tuned with them
    cfg = CoderConfig(d_in=d, n_latents=n_latents, activation="relu", decoder_norm="penalty", init_scale=1.0)
    coder = BatchedCoder.initialised(cfg, [s.seed for s in specs])
    hyper = grid_hyper(specs, tanh_c)
    G = len(specs)
    opt = torch.optim.Adam(coder.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(data_seed)
    jac_idx = hyper.jacobian_members
    tail = max(1, steps // 20)
    fired = torch.zeros(G, n_latents)  # firings since the last resampling check
    n_resampled = torch.zeros(G, dtype=torch.long)
    sums: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True,
               mininterval=0.5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, decay_frac)
        x = sample_with_repeats(G, batch, d, density, hyper.repeat_frac, p, gen)
        v = None
        if jac_idx.numel():  # Gaussian probes [n_probes, G, B, d] (only the Jacobian members use them)
            v = torch.randn((n_probes, *x.shape), generator=gen, dtype=x.dtype)
        ramp = min(1.0, (step + 1) / (sparsity_warmup_frac * steps)) if sparsity_warmup_frac > 0 else 1.0
        terms = member_losses(coder, mlp, x, hyper, v, sparsity_scale=ramp)
        total = terms["total"].sum()
        if not torch.isfinite(total):
            raise TrainingDiverged(f"toy grid: loss became {float(total)} at step {step}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if resample_every > 0 and step < resample_until_frac * steps:
            fired += terms["fired"]
            if (step + 1) % resample_every == 0:
                with torch.no_grad():
                    dead = fired < dead_rate * resample_every * batch
                    y_hat, _, _ = coder.forward_full(x)
                    n_resampled += resample_dead_(coder, opt, dead, x, mlp(x) - y_hat, gen)
                fired.zero_()
        if step >= steps - tail:
            for k, t in terms.items():
                if k != "fired":
                    sums[k] = sums.get(k, 0) + t.detach()
        if progress and step % 200 == 0:
            bar.set_postfix(loss=f"{float(total.detach()) / G:.4f}")
    bar.close()
    final = {k: (t / tail).tolist() for k, t in sums.items()}
    log.info("toy grid: %d members, %d steps in %.1f s; %d dead latents resampled", G, steps,
             time.perf_counter() - start, int(n_resampled.sum()))
    return GridResult(coder, list(specs), final, time.perf_counter() - start,
                      n_resampled.tolist())


@torch.no_grad()
def resample_dead_(coder: BatchedCoder, opt: torch.optim.Adam, dead: torch.Tensor, x: torch.Tensor,
                   residual: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Re-initialise latents that never fired since the last check (Bricken et al., 2023).

    For each member, every dead latent gets an input of the current batch drawn with probability
    proportional to the member's squared error on it; the latent's decoder row becomes the unit
    residual ``y - y_hat`` of that input, its encoder column the unit input scaled to 0.2 times the
    mean encoder norm of the live latents, its bias 0; Adam's moments of these entries are reset.
    ``dead`` [G, n]; ``x``, ``residual`` [G, B, d]. Returns how many latents were resampled per member.
    """
    counts = dead.sum(dim=1)
    if int(counts.sum()) == 0:
        return counts
    err = residual.pow(2).sum(-1)  # [G, B]
    enc_norm = coder.W_enc.norm(dim=1)  # [G, n]
    alive = (~dead).to(enc_norm.dtype)
    scale = 0.2 * (enc_norm * alive).sum(1) / alive.sum(1).clamp_min(1)  # [G]
    scale = torch.where(alive.sum(1) > 0, scale, torch.full_like(scale, 0.2))
    state = opt.state
    for g in torch.nonzero(counts).flatten().tolist():
        idx = torch.nonzero(dead[g]).flatten()
        weights = err[g] + 1e-12
        pick = torch.multinomial(weights, idx.numel(), replacement=True, generator=gen)
        xs, rs = x[g, pick], residual[g, pick]  # [k, d]
        enc = xs / xs.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale[g]
        dec = rs / rs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        coder.W_enc[g][:, idx] = enc.T
        coder.W_dec[g][idx] = dec
        coder.b_enc[g][idx] = 0.0
        for param, sl in ((coder.W_enc, (g, slice(None), idx)), (coder.W_dec, (g, idx)),
                          (coder.b_enc, (g, idx))):
            st = state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key][sl] = 0.0
    return counts
