"""The ground-truth model of the toy task: a real one-layer ReLU MLP that computes ``abs`` exactly.

``y = ReLU(x W_in + b_in) W_out + b_out`` with 2d hidden neurons::

    W_in  = [I_d, -I_d]   [d, 2d]      neuron i   computes ReLU( x_i)
    W_out = [I_d; I_d]    [2d, d]      neuron d+i computes ReLU(-x_i)
    b_in = 0, b_out = 0                y_i = ReLU(x_i) + ReLU(-x_i) = |x_i|

It is an ordinary :class:`torch.nn.Module` with weights, so the code that collects activations,
differentiates or replaces an MLP (``torch.func.jvp``, hooks, Jacobian matching) serves it and a
real language-model MLP alike. It accepts inputs of any leading shape ``[..., d]``.

Jacobian convention: ``J(x) = diag(sign(x_i))`` with ReLU'(0) = 0 (PyTorch's convention), so a
coordinate that is exactly 0 -- most coordinates of the sparse toy data -- has derivative 0, and
the Jacobian at ``p = [1, 1, 1, 0, ...]`` is ``diag(1, 1, 1, 0, ..., 0)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechfaith.errors import ConfigError


class AbsMLP(nn.Module):
    """A ReLU MLP ``[..., d] -> [..., d]`` whose weights implement ``y = |x|`` coordinate-wise."""

    def __init__(self, d: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(d, int) or d <= 0:
            raise ConfigError(f"AbsMLP: d must be a positive integer, got {d!r}")
        eye = torch.eye(d, dtype=dtype)
        self.W_in = nn.Parameter(torch.cat([eye, -eye], dim=1), requires_grad=False)  # [d, 2d]
        self.b_in = nn.Parameter(torch.zeros(2 * d, dtype=dtype), requires_grad=False)  # [2d]
        self.W_out = nn.Parameter(torch.cat([eye, eye], dim=0), requires_grad=False)  # [2d, d]
        self.b_out = nn.Parameter(torch.zeros(d, dtype=dtype), requires_grad=False)  # [d]

    @property
    def d(self) -> int:
        return self.W_in.shape[0]

    def hidden(self, x: Tensor) -> Tensor:
        """The 2d neuron activations ``ReLU(x W_in + b_in)`` [..., 2d]."""
        return torch.relu(x @ self.W_in + self.b_in)

    def forward(self, x: Tensor) -> Tensor:
        """``|x|`` computed through the neurons, [..., d]."""
        return self.hidden(x) @ self.W_out + self.b_out


def abs_jacobian(x: Tensor) -> Tensor:
    """The known Jacobian ``diag(sign(x))`` [batch, d, d] (sign(0) = 0); for tests and plots only --
    training differentiates the module itself."""
    return torch.diag_embed(torch.sign(x))
