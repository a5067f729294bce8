"""The earlier path of `denselora.io.bundle`, where this module lives now."""

from .io.bundle import *  # noqa: F403
