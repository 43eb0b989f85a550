"""The toy task's library of ideal circuits, for :mod:`mechfaith.faithfulness.circuit_library`.

- ``+x_i``: ``y_i += ReLU(x_i)``, and ``-x_i``: ``y_i += ReLU(-x_i)``, for every coordinate i;
- ``datapoint``: ``y += p * ReLU(p . x - (||p||^2 - 1))``, the datapoint circuit ``p ReLU(lambda_p
  (p . x) - b)`` with lambda_p = 1 and b = ||p||^2 - 1: it fires only when the projection of x on p
  is within 1 of p's own (for p = [1,1,1,0..]: p . x > 2), and writes exactly p at x = p.

The shared sample on which features are compared is sparse data with ``p`` mixed in at
``sample_repeat_frac`` (default 5%), so that the datapoint circuit is visible in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechfaith.faithfulness.circuit_library import CircuitLibrary
from mechfaith.toy.data import sample_with_repeats


def abs_library(p: Tensor) -> CircuitLibrary:
    """The 2d ReLU circuits plus the datapoint circuit of ``p`` [d]."""
    d = p.shape[0]
    names: list[str] = []
    circuits = []

    def relu_circuit(i: int, sign: float):
        def fn(x: Tensor) -> Tensor:
            out = torch.zeros(x.shape[0], d, dtype=x.dtype)
            out[:, i] = torch.relu(sign * x[:, i])
            return out
        return fn

    for i in range(d):
        names.append(f"+x{i + 1}")
        circuits.append(relu_circuit(i, 1.0))
    for i in range(d):
        names.append(f"-x{i + 1}")
        circuits.append(relu_circuit(i, -1.0))
    pp = p.to(torch.float32)
    bias = float(pp @ pp) - 1.0

    def datapoint_circuit(x: Tensor) -> Tensor:
        return torch.relu(x @ pp.to(x.dtype) - bias).unsqueeze(1) * pp.to(x.dtype)

    names.append("datapoint")
    circuits.append(datapoint_circuit)
    return CircuitLibrary(names, circuits)


def library_sample(p: Tensor, n: int, density: float, repeat_frac: float = 0.05,
                   seed: int = 1234) -> Tensor:
    """The shared sample [n, d] (sparse data with p mixed in at ``repeat_frac``)."""
    gen = torch.Generator().manual_seed(seed)
    rf = torch.tensor([repeat_frac])
    return sample_with_repeats(1, n, p.shape[0], density, rf, p, gen)[0]
