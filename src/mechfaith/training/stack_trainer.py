"""A stack of K coders as one member of the training engine (the toy's grid, a sweep).

:class:`StackTrainer` trains a :class:`~mechfaith.training.stack.CoderStack` with one Adam over the
stacked weights (elementwise, so every member gets exactly its own update), the TrainConfig's
learning-rate and sparsity schedules, per-member gradient clipping, unit-norm decoders, optional
bfloat16 autocast of the sparse TopK path, and dead-latent resampling (:class:`Resampling`, Bricken
et al. 2023: a latent that fired on too few inputs since the last check gets an input drawn in
proportion to the member's squared error). Per-member settings come from
:class:`~mechfaith.training.stack.StackMember` (or are given as a
:class:`~mechfaith.training.stack.StackSettings`).

Log records hold one value per member for every metric (lists of K floats): ``loss``,
``grad_norm`` and, on log steps, ``mse``, ``fve``, ``l0``, ``sparsity``, ``jacobian``,
``jacobian_rel``. Not supported in a stack: AuxK (use resampling), skip connections, checkpoints
(export members with :meth:`CoderStack.member_coder`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mechfaith.configs import doc
from mechfaith.errors import ConfigError, InputError
from mechfaith.training.config import TrainConfig
from mechfaith.training.engine import EngineMember, PendingStep
from mechfaith.training.optim import make_adam, set_lr
from mechfaith.training.schedules import lr_at, warmup_factor
from mechfaith.training.stack import CoderStack, StackMember, StackSettings
from mechfaith.training.stack_losses import References, StackTerms, stack_losses

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16")


@dataclass
class Resampling:
    """When and how dead latents are re-initialised (off when ``every`` is 0)."""

    every: int = doc("Check for dead latents every this many steps (0 = never).", 0)
    until_frac: float = doc("Resample only during this first fraction of the steps.", 0.6)
    dead_rate: float = doc("A latent is dead when it fired on fewer than this fraction of the "
                           "inputs since the last check.", 1e-3)

    def __post_init__(self) -> None:
        if self.every < 0 or not 0 <= self.until_frac <= 1 or not 0 <= self.dead_rate <= 1:
            raise ConfigError("Resampling: every must be >= 0, until_frac and dead_rate in [0, 1]")


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


def settings_for(cfg: TrainConfig, members: Sequence[StackMember]) -> StackSettings:
    """Per-member coefficients: each member's own, else the TrainConfig's."""
    pick = lambda own, base: [getattr(m, own) if getattr(m, own) is not None else base for m in members]
    return StackSettings.build(pick("sparsity", cfg.sparsity), pick("sparsity_coef", cfg.sparsity_coef),
                               pick("jacobian_coef", cfg.jacobian_coef),
                               pick("jacobian_contribution_coef", cfg.jacobian_contribution_coef), cfg.tanh_scale)


class StackTrainer(EngineMember):
    """Trains a :class:`CoderStack` in place (see the module docstring).

    ``settings``: the members' coefficients (default: from ``members``, or the TrainConfig's for
    all). ``reference``: one function applied to all members' inputs at once, or one per member.
    ``generator``: the source of Jacobian probes and resampling draws (default: seeded
    ``cfg.seed``); the toy passes its data generator so its random numbers keep their order.
    ``fused_adam``: the fused Adam kernel (as :class:`Trainer`) or the plain one (the toy's).
    ``average_last``: keep the mean of every loss term over the last this many steps
    (:attr:`tail_means`).
    """

    def __init__(self, stack: CoderStack, cfg: TrainConfig, *, members: Sequence[StackMember] | None = None,
                 settings: StackSettings | None = None, reference: References | None = None,
                 resampling: Resampling | None = None, generator: torch.Generator | None = None,
                 fused_adam: bool = True, mixed_precision: str = "no", average_last: int = 0,
                 log_path: str | Path | None = None, progress: bool = True, desc: str = "stack",
                 name: str = "stack") -> None:
        if cfg.auxk_coef > 0:
            log.debug("a stack does not use AuxK (auxk_coef ignored); use resampling")
        if mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        K = stack.n_members
        if settings is None:
            settings = settings_for(cfg, members if members is not None else [StackMember()] * K)
        if settings.lam_tanh.numel() != K:
            raise ConfigError(f"settings for {settings.lam_tanh.numel()} members; the stack has {K}")
        if settings.jacobian_members.numel() and reference is None:
            raise ConfigError("Jacobian matching (jacobian_coef > 0) needs a reference function")
        if reference is not None and not callable(reference) and len(reference) != K:
            raise ConfigError(f"{len(reference)} reference functions for a stack of {K}")
        self.device = torch.device(cfg.device)
        self.stack = stack.to(self.device)
        self.cfg, self.settings, self.reference = cfg, settings, reference
        self.resampling = resampling or Resampling()
        self.generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        self.autocast = mixed_precision == "bf16"
        if self.autocast and not bf16_supported(self.device):
            log.warning("bf16 is not native on %s; training in float32", self.device)
            self.autocast = False
        self.params = [stack.W_enc, stack.b_enc, stack.W_dec, stack.b_dec]
        self.optimizer = make_adam(self.params, cfg, fused=fused_adam)
        self.unit = stack.decoder_norm == "unit"
        self.n_steps, self.log_every = cfg.n_steps, cfg.log_every
        self.log_path = Path(log_path) if log_path is not None else None
        self.progress, self.desc, self.name = progress, desc, name
        self.checkpoint_dir = None
        self.step_count, self.tokens_seen, self.elapsed_s = 0, 0, 0.0
        self.metrics_history: list[dict[str, Any]] = []
        self.pending_stream_state = None
        self.fired = torch.zeros(K, stack.W_enc.shape[2], device=self.device)  # since the last check
        self.n_resampled = torch.zeros(K, dtype=torch.long)
        self.average_last = average_last
        self.tail_sums: dict[str, Tensor] = {}
        if self.unit:
            stack.normalize_decoder_()

    # ------------------------------------------------------------------------------- the step
    def _prepare(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        stack, K = self.stack, self.stack.n_members
        d_in, d_out = stack.W_enc.shape[1], stack.W_dec.shape[2]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (2, 3) or x.shape[-1] != d_in \
                or (x.ndim == 3 and x.shape[0] != K):
            raise InputError(f"a stack's batch x must be a float tensor [batch, {d_in}] or [{K}, batch, {d_in}]")
        x = x.detach().to(self.device, stack.W_enc.dtype)
        if y is not None:
            if not isinstance(y, Tensor) or y.shape[:-1] != x.shape[:-1] and y.shape[:-1] != x.shape[-2:-1] \
                    or y.shape[-1] != d_out:
                raise InputError(f"a stack's batch y must match x with last dimension {d_out}")
            y = y.detach().to(self.device, stack.W_enc.dtype)
        return x, y

    def begin_step(self, x: Tensor, y: Tensor | None, want_metrics: bool) -> PendingStep:
        cfg, stack, index = self.cfg, self.stack, self.step_count
        given = (x, y)
        x, y = self._prepare(x, y)
        lr = lr_at(index, cfg)
        set_lr(self.optimizer, lr)
        v = None
        if self.settings.jacobian_members.numel():  # Gaussian probes [n_probes, K, B, d]
            shape = stack.expand_input(x).shape
            v = torch.randn((cfg.n_probes, *shape), generator=self.generator, dtype=x.dtype).to(self.device)
        ramp = warmup_factor(index, cfg.sparsity_warmup_steps)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            terms = stack_losses(stack, x, self.settings, self.reference, v, y, ramp, bf16=self.autocast)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.sum().backward()
        if self.unit:
            stack.remove_parallel_decoder_grad_()
        sq: Tensor | int = 0
        for p in self.params:
            assert p.grad is not None  # every parameter enters terms.total
            sq = sq + p.grad.square().reshape(p.shape[0], -1).sum(dim=1)
        norms = torch.as_tensor(sq).sqrt()  # [K]
        if cfg.grad_clip > 0:
            c = (cfg.grad_clip / (norms + 1e-6)).clamp(max=1.0)
            for p in self.params:
                assert p.grad is not None  # checked above
                p.grad.mul_(c.view(-1, *([1] * (p.ndim - 1))))
        names = ["loss", "grad_norm"]
        with torch.no_grad():
            values = [terms.total.detach(), norms.detach()]
            if want_metrics:
                target = terms.target if terms.target.ndim == 3 else terms.target.unsqueeze(0)
                var = (target - target.mean(dim=1, keepdim=True)).square().sum(dim=(1, 2)).clamp_min(1e-30)
                B = x.shape[-2]
                l0 = terms.fired.sum(dim=1).to(torch.float64) / B
                names += ["mse", "fve", "l0", "sparsity", "jacobian", "jacobian_rel"]
                values += [terms.mse.detach(), 1 - terms.mse.detach() * B / var.expand_as(terms.mse), l0,
                           terms.sparsity.detach(), terms.jacobian.detach(),
                           terms.jacobian.detach() / terms.jacobian_ref_sq.detach().clamp_min(1e-30)]
            flat = torch.cat([v.reshape(-1).to(torch.float64) for v in values])
        return PendingStep(names, flat, (terms, x, y, lr), given)

    def abort_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def finish_step(self, pending: PendingStep, got: dict[str, Any]) -> dict[str, Any]:
        terms, x, y, lr = pending.state
        index = self.step_count
        self.optimizer.step()
        if self.unit:
            self.stack.normalize_decoder_()
        self._resample_if_due(index, terms, x, y)
        if self.average_last and index >= self.n_steps - self.average_last:
            for key in ("mse", "tanh_l1", "l1", "jacobian", "jac_contrib", "sparsity", "total"):
                t = getattr(terms, key).detach()
                self.tail_sums[key] = self.tail_sums.get(key, 0) + t
        self.step_count += 1
        self.tokens_seen += x.shape[-2]
        record: dict[str, Any] = {"step": self.step_count, "tokens": self.tokens_seen, "lr": lr}
        record.update(got)
        return record

    def _resample_if_due(self, index: int, terms: StackTerms, x: Tensor, y: Tensor | None) -> None:
        rs = self.resampling
        if rs.every <= 0 or not index < rs.until_frac * self.n_steps:
            return
        self.fired += terms.fired
        if (index + 1) % rs.every:
            return
        with torch.no_grad():
            dead = self.fired < rs.dead_rate * rs.every * x.shape[-2]
            y_hat, _, _ = self.stack.forward_dense(x)
            target = y if y is not None else terms.target
            xs = self.stack.expand_input(x)
            residual = (target if target.ndim == 3 else target.unsqueeze(0)) - y_hat
            self.n_resampled += resample_dead_(self.stack, self.optimizer, dead, xs, residual,
                                               self.generator).cpu()
        self.fired.zero_()

    @property
    def tail_means(self) -> dict[str, list[float]]:
        """Mean of each loss term over the last ``average_last`` steps, per member."""
        n = min(self.average_last, self.step_count) or 1
        return {k: (t / n).tolist() for k, t in self.tail_sums.items()}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        losses = record["loss"]
        return {"loss": f"{sum(losses) / len(losses):.4g}"}


@torch.no_grad()
def resample_dead_(stack: CoderStack, opt: torch.optim.Optimizer, dead: Tensor, x: Tensor,
                   residual: Tensor, gen: torch.Generator) -> Tensor:
    """Re-initialise latents that never fired since the last check (Bricken et al., 2023).

    For each member, every dead latent gets an input of the current batch drawn with probability
    proportional to the member's squared error on it; the latent's decoder row becomes the unit
    residual ``y - y_hat`` of that input, its encoder column the unit input scaled to 0.2 times the
    mean encoder norm of the live latents, its bias 0; Adam's moments of these entries are reset.
    ``dead`` [K, n] (latents beyond a member's width are never dead); ``x``, ``residual`` [K, B, d].
    Returns how many latents were resampled per member.
    """
    dead = dead & (stack.width_mask > 0)
    counts = dead.sum(dim=1)
    if int(counts.sum()) == 0:
        return counts
    err = residual.pow(2).sum(-1)  # [K, B]
    enc_norm = stack.W_enc.norm(dim=1)  # [K, n]
    alive = (~dead).to(enc_norm.dtype) * stack.width_mask
    scale = 0.2 * (enc_norm * alive).sum(1) / alive.sum(1).clamp_min(1)  # [K]
    scale = torch.where(alive.sum(1) > 0, scale, torch.full_like(scale, 0.2))
    state = opt.state
    for g in torch.nonzero(counts).flatten().tolist():
        idx = torch.nonzero(dead[g]).flatten()
        weights = err[g] + 1e-12
        # drawn on the generator's device (the CPU), so a run draws the same rows on every device
        pick = torch.multinomial(weights.to(gen.device), idx.numel(), replacement=True, generator=gen).to(x.device)
        xs, rs = x[g, pick], residual[g, pick]  # [k, d]
        enc = xs / xs.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale[g]
        dec = rs / rs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        stack.W_enc[g][:, idx] = enc.T
        stack.W_dec[g][idx] = dec
        stack.b_enc[g][idx] = 0.0
        for param, sl in ((stack.W_enc, (g, slice(None), idx)), (stack.W_dec, (g, idx)),
                          (stack.b_enc, (g, idx))):
            st = state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key][sl] = 0.0
    return counts
