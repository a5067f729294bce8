# Type stubs for the compiled extension `denselora._core` (the Rust core's binding).
from os import PathLike
from typing import Mapping, Optional, Union

import numpy as np

_Path = Union[str, PathLike[str]]

__version__: str
ADAPTER_FORMAT_VERSION: int

def save_adapter(path: _Path, config_json: str, tensors: Mapping[str, np.ndarray]) -> None: ...
def load_adapter(path: _Path) -> tuple[str, dict[str, tuple[str, np.ndarray]]]: ...
def save_safetensors(path: _Path, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None: ...
def write_text_atomic(path: _Path, text: str) -> None: ...
def dense_branch(
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
def kernel_isa() -> str: ...

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
    def add_unchecked(self, x_ptr: int, out_ptr: int, rows: int, dtype_code: int, num_threads: int) -> None: ...
