"""The earlier path of `denselora.training.evaluation`, where this module lives now."""

from .training.evaluation import *  # noqa: F403
