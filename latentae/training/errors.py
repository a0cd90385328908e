"""What can stop a training run, as exceptions whose message is the whole story."""

from __future__ import annotations

from latentae.checkpoint import CheckpointError
from latentae.config import ConfigError
from latentae.perceptual import MissingWeightsError


class TrainingError(RuntimeError):
    """A problem the user has to fix; the message says everything (train.py prints it without a traceback)."""


class StartupError(TrainingError):
    """Raised before step 0: bad data path, empty dataset, unusable init weights, output folder in use ..."""


class NonFiniteError(TrainingError):
    """A loss term or gradient norm became NaN/inf; names the step and the term."""


class PeerFailedError(RuntimeError):
    """Another rank failed (or died); this rank ends too. The message is that rank's."""

    def __init__(self, rank: int | None, message: str):
        self.rank, self.message = rank, message
        who = f"rank {rank}" if rank is not None else "another rank"
        super().__init__(f"{who} failed: {message}")


class StopNow(BaseException):
    """A second stop signal while the requested stop was still pending: end at once, no checkpoint.

    A BaseException (like KeyboardInterrupt), so no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int, message: str):
        self.signum = signum
        super().__init__(message)


def on_every_rank(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises at the same point (a decision they agreed on,
    e.g. a non-finite loss seen through the step's all-reduce): no rank has to be told
    about another's (see ``Ranks.fail``). Returns ``exc``."""
    exc.on_every_rank = True  # type: ignore[attr-defined]
    return exc


# What a command line prints as one clean line (no traceback): the message is the whole story.
USER_ERRORS = (ConfigError, TrainingError, MissingWeightsError, CheckpointError)

__all__ = [
    "NonFiniteError",
    "PeerFailedError",
    "StartupError",
    "StopNow",
    "TrainingError",
    "USER_ERRORS",
    "on_every_rank",
]
