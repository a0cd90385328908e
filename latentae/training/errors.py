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


# What a command line prints as one clean line (no traceback): the message is the whole story.
USER_ERRORS = (ConfigError, TrainingError, MissingWeightsError, CheckpointError)

__all__ = ["NonFiniteError", "StartupError", "TrainingError", "USER_ERRORS"]
