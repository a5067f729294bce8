"""Exceptions raised by denselora.

Every error names what it is about (file, adapter, module, tensor or argument). The classes also
derive from the matching built-in (``ValueError``, ``TypeError``) so generic handlers keep working.
File-system problems are raised as the built-in ``OSError`` family (``FileNotFoundError``, ...).
"""

from __future__ import annotations


class DenseLoRAError(Exception):
    """Base class of every denselora error."""


class ConfigError(DenseLoRAError, ValueError):
    """A configuration value that cannot work (rank, activation, target modules, ...)."""


class FormatError(DenseLoRAError, ValueError):
    """A file that is not what it claims to be: truncated, malformed, or with a header that lies."""


class ChecksumError(FormatError):
    """Stored bytes that do not match their recorded checksum."""


class IncompatibleAdapterError(DenseLoRAError, ValueError):
    """Adapter contents that do not fit a model, a config or another adapter."""


class NotMergeableError(DenseLoRAError, ValueError):
    """An operation that needs a linear (``identity``) branch was asked of a non-linear one."""


class ArgumentError(DenseLoRAError, ValueError):
    """A caller-supplied value that is out of range or otherwise unusable."""


class ShapeError(ArgumentError):
    """Arrays whose shapes do not fit together."""


class DTypeError(DenseLoRAError, TypeError):
    """An array of an element type the operation does not take."""


class LayoutError(ArgumentError):
    """An array whose memory layout cannot be viewed without a copy (e.g. not contiguous)."""


class NonFiniteError(DenseLoRAError, ValueError):
    """NaN or infinity where only finite numbers make sense."""


__all__ = [
    "ArgumentError",
    "ChecksumError",
    "ConfigError",
    "DTypeError",
    "DenseLoRAError",
    "FormatError",
    "IncompatibleAdapterError",
    "LayoutError",
    "NonFiniteError",
    "NotMergeableError",
    "ShapeError",
]
