"""Dead-latent tracking and the AuxK auxiliary loss (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders").

A latent is *dead* when it has not fired (nonzero activation) on any of the last ``window`` tokens.
The AuxK loss lets dead latents model what the coder gets wrong: with the residual
``e = y - y_hat`` (detached), take in each row the ``k`` largest pre-activations among dead latents,
decode them without bias along the unit decoder directions, ``e_hat = sum_i max(pre_i, 0)
W_dec[i] / ||W_dec[i]||``, and penalise ``||e - e_hat||^2 / sum ||e - mean(e)||^2`` (normalised
like the FVU, so the coefficient does not depend on the data's scale; as in the public
``sparsify`` implementation).

Two choices made here (both leave Gao et al.'s loss unchanged where their setting applies):

- Straight-through ReLU on the selected values: the forward pass uses ``max(pre, 0)`` as Gao's
  TopK latents do, but the gradient reaches ``pre`` as if no ReLU were there. Gao's TopK latents
  die with positive pre-activations that never make the top k, where nothing changes; a ReLU (or
  JumpReLU) latent dies with negative pre-activations everywhere, where a plain ReLU would give it
  a zero gradient. With the straight-through gradient, a dead latent whose decoder direction points
  along the residual has its pre-activation raised until it fires again. The loss stays bounded
  (about 1 when nothing is explained), so it cannot swamp the other terms or the gradient clipping.
- The decoder rows enter as unit directions (Gao et al. train unit-norm decoders, where this
  changes nothing); with free rows the loss is cheapest to lower by shrinking dead latents' rows,
  which revives nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DeadLatentTracker:
    """Counts, per latent, the tokens seen since it last fired (int64 tensor on the coder's device)."""

    def __init__(self, n_latents: int, device: torch.device | str | None = None) -> None:
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)  # [n]

    def update(self, fired: Tensor, n_tokens: int) -> None:
        """Record a batch of ``n_tokens`` rows in which the latents ``fired`` [n] (bool) fired."""
        self.tokens_since_fired.add_(n_tokens)
        self.tokens_since_fired.masked_fill_(fired, 0)

    def dead_mask(self, window: int) -> Tensor:
        """Bool [n]: which latents are dead."""
        return self.tokens_since_fired >= window

    def dead_fraction(self, window: int) -> Tensor:
        """0-dim float tensor: the fraction of dead latents."""
        return self.dead_mask(window).float().mean()

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        t = state["tokens_since_fired"]
        if t.shape != self.tokens_since_fired.shape:
            raise ValueError(f"dead-latent tracker holds {tuple(t.shape)}, "
                             f"expected {tuple(self.tokens_since_fired.shape)}")
        self.tokens_since_fired.copy_(t)


def auxk_loss(pre: Tensor, residual: Tensor, W_dec: Tensor, dead: Tensor, k: int) -> Tensor:
    """The AuxK loss (see the module docs).

    pre [batch, n_latents] pre-activations (with their graph), residual [batch, d_out] ``y - y_hat``
    (detached), W_dec [n_latents, d_out] (its rows are used as unit directions), dead [n_latents]
    bool; ``k`` should not exceed the number of dead latents (picks beyond it count as 0).
    Returns a 0-dim tensor.
    """
    k = min(int(k), pre.shape[1])
    if k <= 0:
        return pre.new_zeros(())
    masked = pre.masked_fill(~dead, float("-inf"))  # [batch, n]
    values, indices = masked.topk(k, dim=-1, sorted=False)  # [batch, k]
    values = values.masked_fill(values == float("-inf"), 0.0)  # only if k exceeded the dead count
    values = values + (values.clamp_min(0) - values).detach()  # ReLU forward, straight-through grad
    f_aux = torch.zeros_like(pre).scatter(-1, indices, values)  # [batch, n], dead latents only
    directions = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(W_dec.dtype).tiny)
    e_hat = f_aux @ directions  # [batch, d_out], no bias
    residual = residual.detach()
    scale = (residual - residual.mean(dim=0, keepdim=True)).square().sum()
    return (e_hat - residual).square().sum() / scale.clamp_min(torch.finfo(pre.dtype).tiny)
