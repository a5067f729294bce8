# Type stubs for the compiled extension `denselora._core` (the Rust core's binding).
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

_Path = Union[str, PathLike[str]]

__version__: str
ADAPTER_FORMAT_VERSION: int
TENANT_FORMAT_VERSION: int

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

def save_adapter(path: _Path, config_json: str, tensors: Mapping[str, np.ndarray]) -> None: ...
def load_adapter(path: _Path) -> tuple[str, dict[str, tuple[str, np.ndarray]]]: ...
def save_safetensors(path: _Path, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None: ...
def write_text_atomic(path: _Path, text: str) -> None: ...

BUNDLE_FORMAT_VERSION: int

class MappedBundle:
    """The base object of arrays viewing a bundle's memory map (keeps the map alive)."""

class Bundle:
    def __init__(self, path: _Path) -> None: ...
    @property
    def path(self) -> Path: ...
    def reopen(self) -> Bundle: ...
    def names(self) -> list[str]: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: str) -> bool: ...
    def config_json(self, name: str) -> str: ...
    def tensors(self, name: str, verify: bool = True) -> dict[str, tuple[str, np.ndarray]]: ...
    def tensor_info(self, name: str) -> list[tuple[str, str, list[int], int, int, Optional[str]]]: ...
    def groups(self, name: str) -> list[tuple[str, int, int, int, int, int]]: ...
    def stats(self) -> dict[str, int]: ...
    def verify(self, progress: Optional[Callable[[int, int], Any]] = None) -> None: ...
    def unpack(
        self, out: _Path, names: Sequence[str] = ..., progress: Optional[Callable[[str], Any]] = None
    ) -> list[Path]: ...

def pack_bundle(
    dest: _Path,
    entries: list[tuple[str, Union[_Path, tuple[str, Mapping[str, np.ndarray]]]]],
    dtype: Optional[str] = None,
    keep_existing: bool = False,
    progress: Optional[Callable[[str], Any]] = None,
) -> dict[str, int]: ...
def average_adapters(
    inputs: Sequence[tuple[str, str, Mapping[str, np.ndarray]]],
    mode: str = "auto",
    weights: Optional[Sequence[float]] = None,
    ema: Optional[float] = None,
    decoder_alignment: str = "product",
) -> tuple[str, dict[str, tuple[str, np.ndarray]], str]: ...
def truncate_adapter(
    name: str,
    config_json: str,
    tensors: Mapping[str, np.ndarray],
    rank: Optional[int] = None,
    energy: Optional[float] = None,
) -> tuple[str, dict[str, tuple[str, np.ndarray]], str]: ...
def linear_assignment(cost: Sequence[Sequence[float]]) -> list[int]: ...
def fused_branch(
    x: np.ndarray,
    encoder: np.ndarray,
    m: np.ndarray,
    decoder: np.ndarray,
    out: np.ndarray,
    *,
    scale: float,
    encoder_activation: str,
    decoder_activation: str,
    num_threads: int,
    check_finite: bool = False,
) -> None: ...
def fused_routed_branch(
    x: np.ndarray,
    encoder: np.ndarray,
    cores: np.ndarray,
    decoder: np.ndarray,
    row_core: np.ndarray,
    out: np.ndarray,
    *,
    scale: float,
    encoder_activation: str,
    decoder_activation: str,
    num_threads: int,
    check_finite: bool = False,
) -> None: ...
def kernel_isa() -> str: ...
def kernel_available_isas() -> list[str]: ...
def kernel_set_isa(name: Optional[str]) -> None: ...

class PreparedBranch:
    """One layer's E, M, D held for the inference fast path (see denselora.layer)."""

    def __init__(
        self,
        encoder: np.ndarray,
        m: np.ndarray,
        decoder: np.ndarray,
        *,
        scale: float,
        encoder_activation: str,
        decoder_activation: str,
    ) -> None: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    def add_unchecked(self, x_ptr: int, out_ptr: int, rows: int, dtype: str, num_threads: int) -> None: ...

class PreparedRoutedBranch:
    """One layer's shared E and D and a stack of cores (T, r_d, r_e), viewed in place, for the
    routed fast path of mixed-adapter batches."""

    def __init__(
        self,
        encoder: np.ndarray,
        cores: np.ndarray,
        decoder: np.ndarray,
        *,
        scale: float,
        encoder_activation: str,
        decoder_activation: str,
    ) -> None: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def num_cores(self) -> int: ...
    def add_unchecked(
        self, x_ptr: int, out_ptr: int, row_core_ptr: int, rows: int, dtype: str, num_threads: int
    ) -> None: ...

def dropout_mask(out: np.ndarray, seed: int, threshold: int, offset: int = 0) -> None:
    """Fill the writable 1-D bool array ``out`` with whether element ``offset + i`` of the
    counter-based dropout stream for ``seed`` is dropped (P(drop) = threshold / 65536)."""

def dropout_zero_(data: np.ndarray, seed: int, threshold: int, offset: int = 0) -> None:
    """Zero, in place, the elements of the writable 1-D integer array ``data`` (float data viewed
    as integers of its width: 16, 32 or 64 bits) that element ``offset + i`` of the dropout stream
    for ``seed`` drops; the mask of `dropout_mask`, applied without materialising it."""
