"""Exceptions raised by denselora.

Every error names what it is about (file, adapter, module, tensor or argument). The classes also
derive from the matching built-in (``ValueError``, ``TypeError``) so generic handlers keep working.
File-system problems are raised as the built-in ``OSError`` family (``FileNotFoundError``, ...).

The hierarchy is declared in the compiled core (``denselora._core``), which raises these classes
itself; they live here (``__module__`` is ``denselora.errors``), where they are imported from:

- ``DenseLoRAError`` (``Exception``)
  - ``ConfigError``, ``IncompatibleAdapterError``, ``NotMergeableError``, ``NonFiniteError``
    (also ``ValueError``)
    - ``IncompatibleAdapterError`` > ``BasisMismatchError`` (a tenant on a basis other than its own)
  - ``FormatError`` (also ``ValueError``) > ``ChecksumError``
  - ``ArgumentError`` (also ``ValueError``) > ``ShapeError``, ``LayoutError``
  - ``DTypeError`` (also ``TypeError``)
"""

from __future__ import annotations

from ._core import (
    ArgumentError,
    BasisMismatchError,
    ChecksumError,
    ConfigError,
    DenseLoRAError,
    DTypeError,
    FormatError,
    IncompatibleAdapterError,
    LayoutError,
    NonFiniteError,
    NotMergeableError,
    ShapeError,
)

__all__ = [
    "ArgumentError",
    "BasisMismatchError",
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
