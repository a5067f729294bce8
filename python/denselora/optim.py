"""The earlier path of `denselora.training.optim`, where this module lives now."""

from .training.optim import *  # noqa: F403
