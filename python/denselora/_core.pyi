# Type stubs for the compiled extension `denselora._core` (the Rust core's binding).
# tests/test_stub.py checks them against the built extension with mypy's stubtest.
# "Raises:" names the denselora.errors classes a call raises (OSError and its subclasses for
# files that cannot be read or written).
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union, final

import numpy as np

_Path = Union[str, PathLike[str]]
# The dtype names the core returns beside each array (bfloat16 arrays hold uint16 bits) ...
_DTypeName = Literal["F32", "F16", "BF16"]
# ... and those it takes (the same, or in lower case).
_DType = Literal["F32", "F16", "BF16", "f32", "f16", "bf16"]
_Activation = Literal["identity", "gelu", "silu"]
_Isa = Literal["avx512bf16", "avx512", "avx2", "portable"]
_Tensors = dict[str, tuple[_DTypeName, np.ndarray]]
# (group, in_features, out_features, encoder_rank, decoder_rank, module paths)
_GroupLayout = tuple[str, int, int, int, int, list[str]]

# In registration order, as the extension lists them.
__all__ = [
    "__version__",
    "DenseLoRAError",
    "ConfigError",
    "FormatError",
    "ChecksumError",
    "IncompatibleAdapterError",
    "NotMergeableError",
    "ArgumentError",
    "ShapeError",
    "DTypeError",
    "LayoutError",
    "NonFiniteError",
    "BasisMismatchError",
    "ADAPTER_FORMAT_VERSION",
    "TENANT_FORMAT_VERSION",
    "save_adapter",
    "open_adapter",
    "adapter_layout",
    "MappedAdapter",
    "save_safetensors",
    "write_text_atomic",
    "Bundle",
    "MappedBundle",
    "pack_bundle",
    "BUNDLE_FORMAT_VERSION",
    "average_adapters",
    "truncate_adapter",
    "linear_assignment",
    "fused_branch",
    "fused_routed_branch",
    "kernel_isa",
    "kernel_available_isas",
    "kernel_set_isa",
    "PreparedBranch",
    "PreparedRoutedBranch",
    "dropout_mask",
    "dropout_zero_",
]

__version__: str
ADAPTER_FORMAT_VERSION: int
TENANT_FORMAT_VERSION: int
BUNDLE_FORMAT_VERSION: int

# The exception hierarchy (re-exported, and documented, by denselora.errors).
class DenseLoRAError(Exception): ...
class ConfigError(DenseLoRAError, ValueError): ...
class FormatError(DenseLoRAError, ValueError): ...
class ChecksumError(FormatError): ...
class IncompatibleAdapterError(DenseLoRAError, ValueError): ...
class BasisMismatchError(IncompatibleAdapterError): ...
class NotMergeableError(DenseLoRAError, ValueError): ...
class ArgumentError(DenseLoRAError, ValueError): ...
class ShapeError(ArgumentError): ...
class DTypeError(DenseLoRAError, TypeError): ...
class LayoutError(ArgumentError): ...
class NonFiniteError(DenseLoRAError, ValueError): ...

def save_adapter(path: _Path, config_json: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write an adapter directory from a config JSON text and float32/float16 arrays.

    Raises: FormatError (config_json is not a JSON object), DTypeError, LayoutError, ArgumentError
    (the arrays), OSError."""

def open_adapter(path: _Path, entry: Optional[str] = None) -> tuple[str, list[_GroupLayout], _Tensors]:
    """Open and validate an adapter directory, or adapter ``entry`` of a bundle (``None``: its only
    adapter): ``(config_json, groups, {name: (dtype, array)})``, the arrays read-only views of the
    memory-mapped file (copies only where a foreign file leaves bytes unaligned).

    Raises: FormatError, ChecksumError (a bundle entry's blobs), IncompatibleAdapterError (tensors
    that do not fit the config), ArgumentError (``entry`` for a directory, no such entry, none
    given for a bundle of several), OSError."""

def adapter_layout(config_json: str, tensors: Mapping[str, np.ndarray], source: str = "adapter") -> list[_GroupLayout]:
    """The groups of an adapter held in memory, after checking its tensors against the config.

    Raises: FormatError (config_json is not a JSON object), IncompatibleAdapterError, DTypeError,
    LayoutError, ArgumentError (the arrays)."""

@final
class MappedAdapter:
    """The base object of arrays viewing an opened adapter's mapped file (keeps the map alive)."""

def save_safetensors(path: _Path, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a plain safetensors file atomically.

    Raises: DTypeError, LayoutError, ArgumentError (the arrays), FormatError, OSError."""

def write_text_atomic(path: _Path, text: str) -> None:
    """Replace a text file atomically.

    Raises: OSError."""

@final
class MappedBundle:
    """The base object of arrays viewing a bundle's memory map (keeps the map alive)."""

@final
class Bundle:
    """An open, memory-mapped bundle.

    Raises (every method that names an adapter): ArgumentError (no adapter of that name)."""

    def __new__(cls, path: _Path) -> Bundle:
        """Raises: FormatError, ChecksumError (the catalog), OSError."""
    @property
    def path(self) -> Path: ...
    def reopen(self) -> Bundle:
        """The bundle now at ``path`` (arrays of this one stay valid). Raises: FormatError, ChecksumError, OSError."""
    def names(self) -> list[str]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: str, /) -> bool: ...
    def config_json(self, name: str) -> str:
        """Raises: ArgumentError, FormatError."""
    def tensors(self, name: str, verify: bool = True) -> _Tensors:
        """Read-only arrays viewing the map.

        Raises: ArgumentError, ChecksumError (with ``verify``), FormatError."""
    def tensor_info(self, name: str) -> list[tuple[str, _DTypeName, list[int], int, int, Optional[_DTypeName]]]:
        """Raises: ArgumentError, FormatError."""
    def groups(self, name: str) -> list[tuple[str, int, int, int, int, int]]:
        """Raises: ArgumentError, FormatError."""
    def stats(self) -> dict[str, int]:
        """Raises: FormatError, OSError."""
    def verify(self, progress: Optional[Callable[[int, int], Any]] = None) -> None:
        """Raises: ChecksumError, FormatError, OSError; what ``progress`` raises."""
    def unpack(self, out: _Path, names: Sequence[str] = ..., progress: Optional[Callable[[str], Any]] = None) -> list[Path]:
        """Raises: ArgumentError, ChecksumError, FormatError, OSError; what ``progress`` raises."""

def pack_bundle(
    dest: _Path,
    entries: list[tuple[str, Union[_Path, tuple[str, Mapping[str, np.ndarray]]]]],
    dtype: Optional[_DType] = None,
    keep_existing: bool = False,
    progress: Optional[Callable[[str], Any]] = None,
) -> dict[str, int]:
    """Pack adapters (directories or ``(config_json, arrays)``) into a bundle, atomically.

    Raises: TypeError (an entry of the wrong form), DTypeError, ShapeError, LayoutError,
    ArgumentError, FormatError, IncompatibleAdapterError, ChecksumError (``keep_existing``),
    OSError; what ``progress`` raises."""

def average_adapters(
    inputs: Sequence[tuple[str, str, Mapping[str, np.ndarray]]],
    mode: Literal["auto", "linear", "aligned"] = "auto",
    weights: Optional[Sequence[float]] = None,
    ema: Optional[float] = None,
    decoder_alignment: Literal["product", "procrustes"] = "product",
) -> tuple[str, _Tensors, str]:
    """Average adapters given as ``(name, config_json, arrays)``: ``(config_json, tensors, report_json)``.

    Raises: ArgumentError (mode, weights, ema, ...), FormatError (a config), IncompatibleAdapterError,
    NonFiniteError, DTypeError, LayoutError."""

def truncate_adapter(
    name: str,
    config_json: str,
    tensors: Mapping[str, np.ndarray],
    rank: Optional[int] = None,
    energy: Optional[float] = None,
) -> tuple[str, _Tensors, str]:
    """Truncate one adapter to ``rank`` or an ``energy`` fraction: ``(config_json, tensors, report_json)``.

    Raises: ArgumentError, FormatError (the config), IncompatibleAdapterError, NonFiniteError,
    DTypeError, LayoutError."""

def linear_assignment(cost: Sequence[Sequence[float]]) -> list[int]:
    """Minimum-cost assignment of a square cost matrix: ``assignment[row] = column``.

    Raises: ShapeError (not square), NonFiniteError."""

def fused_branch(
    x: np.ndarray,
    encoder: np.ndarray,
    m: np.ndarray,
    decoder: np.ndarray,
    out: np.ndarray,
    *,
    scale: float,
    encoder_activation: _Activation,
    decoder_activation: _Activation,
    num_threads: int,
    check_finite: bool = False,
) -> None:
    """``out += scale * act_d(decoder @ m @ act_e(encoder @ x_i))`` for every row of ``x``, in place.

    Raises: ShapeError, DTypeError, LayoutError (not contiguous, read-only or overlapping ``out``),
    ArgumentError (an activation name, a non-finite scale, no threads), NonFiniteError (with
    ``check_finite``)."""

def fused_routed_branch(
    x: np.ndarray,
    encoder: np.ndarray,
    cores: np.ndarray,
    decoder: np.ndarray,
    row_core: np.ndarray,
    out: np.ndarray,
    *,
    scale: float,
    encoder_activation: _Activation,
    decoder_activation: _Activation,
    num_threads: int,
    check_finite: bool = False,
) -> None:
    """The fused branch with core ``cores[row_core[i]]`` for row i (-1: none), in place.

    Raises: ShapeError, DTypeError, LayoutError, ArgumentError (an activation name, a non-finite
    scale, no threads, a core index out of range), NonFiniteError (with ``check_finite``)."""

def kernel_isa() -> _Isa:
    """The kernel's vector backend in use."""

def kernel_available_isas() -> list[_Isa]:
    """The backends this CPU can run, widest first."""

def kernel_set_isa(name: Optional[_Isa]) -> None:
    """Use backend ``name`` from now on (process-wide); ``None`` restores the default.

    Raises: ArgumentError (an unknown backend, or one this CPU cannot run)."""

@final
class PreparedBranch:
    """One layer's E, M, D held for the inference fast path (see denselora.kernels)."""

    def __new__(
        cls,
        encoder: np.ndarray,
        m: np.ndarray,
        decoder: np.ndarray,
        *,
        scale: float,
        encoder_activation: _Activation,
        decoder_activation: _Activation,
    ) -> PreparedBranch:
        """Raises: ShapeError, DTypeError, LayoutError, ArgumentError (an activation name)."""
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    def add_unchecked(self, x_ptr: int, out_ptr: int, rows: int, dtype: _DType, num_threads: int) -> None:
        """Raises: DTypeError (``dtype``), LayoutError (a null address), ArgumentError (no threads)."""

@final
class PreparedRoutedBranch:
    """One layer's shared E and D and a stack of cores (T, r_d, r_e), viewed in place, for the
    routed fast path of mixed-adapter batches."""

    def __new__(
        cls,
        encoder: np.ndarray,
        cores: np.ndarray,
        decoder: np.ndarray,
        *,
        scale: float,
        encoder_activation: _Activation,
        decoder_activation: _Activation,
    ) -> PreparedRoutedBranch:
        """Raises: ShapeError, DTypeError, LayoutError, ArgumentError (an activation name)."""
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def num_cores(self) -> int: ...
    def add_unchecked(self, x_ptr: int, out_ptr: int, row_core_ptr: int, rows: int, dtype: _DType, num_threads: int) -> None:
        """Raises: DTypeError (``dtype``), LayoutError (a null or misaligned address), ArgumentError
        (no threads, a core index out of range)."""

def dropout_mask(out: np.ndarray, seed: int, threshold: int, offset: Optional[int] = None) -> None:
    """Fill the writable 1-D bool array ``out`` with whether element ``offset + i`` of the
    counter-based dropout stream for ``seed`` is dropped (P(drop) = threshold / 65536).

    Raises: ArgumentError (seed, threshold, offset out of range), ShapeError (not 1-D), DTypeError
    (not bool), LayoutError (read-only or not contiguous)."""

def dropout_zero_(data: np.ndarray, seed: int, threshold: int, offset: Optional[int] = None) -> None:
    """Zero, in place, the elements of the writable 1-D integer array ``data`` (float data viewed
    as integers of its width: 16, 32 or 64 bits) that element ``offset + i`` of the dropout stream
    for ``seed`` drops; the mask of `dropout_mask`, applied without materialising it.

    Raises: ArgumentError (seed, threshold, offset out of range), ShapeError (not 1-D), DTypeError
    (not 16-, 32- or 64-bit integers), LayoutError (read-only or not contiguous)."""
