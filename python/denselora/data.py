"""The earlier path of `denselora.training.data`, where this module lives now."""

from .training.data import *  # noqa: F403
