"""The members of the toy's grid: one :class:`MemberSpec` per coder, and their loss settings.

Every member is an ordinary ReLU coder; the grid is a :class:`~mechfaith.training.stack.CoderStack`
trained by the engine (see :mod:`mechfaith.toy.train`). A spec holds what differs per member:
the penalty (tanh-L1 or L1) and its coefficient, the Jacobian-matching and Jacobian-contribution
coefficients, the repeat fraction of the datapoint in its data, and its initialisation seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mechfaith.errors import ConfigError
from mechfaith.training.stack import StackSettings

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


def member_settings(specs: Sequence[MemberSpec], tanh_c: float = 4.0) -> StackSettings:
    """The specs' loss coefficients as the engine's per-member settings."""
    return StackSettings.build([s.penalty for s in specs], [s.sparsity_coef for s in specs],
                               [s.jacobian_coef for s in specs], [s.jac_contrib_coef for s in specs], tanh_c)
