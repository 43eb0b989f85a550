"""Exceptions with one-line messages that name the problem (the CLI prints them as they are)."""


class MechfaithError(Exception):
    """Base class of every error mechfaith raises on purpose."""


class ConfigError(MechfaithError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class InputError(MechfaithError, ValueError):
    """A tensor has the wrong shape or dtype, or holds NaN/inf."""


class CoderFileError(MechfaithError):
    """A saved coder or checkpoint is missing, truncated, corrupt, foreign or of another version."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TrainingDiverged(MechfaithError):
    """The loss became NaN or infinite; training stopped and kept its last good checkpoint."""


class PeerFailed(MechfaithError):
    """Another process of a torchrun group failed, so this one stops too (the message names it)."""
