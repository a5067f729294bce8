# Type stubs for the compiled extension `denselora._core` (the Rust core's binding).
from os import PathLike
from typing import Mapping, Optional, Sequence, Union

import numpy as np

_Path = Union[str, PathLike[str]]

__version__: str
ADAPTER_FORMAT_VERSION: int

def save_adapter(path: _Path, config_json: str, tensors: Mapping[str, np.ndarray]) -> None: ...
def load_adapter(path: _Path) -> tuple[str, dict[str, tuple[str, np.ndarray]]]: ...
def save_safetensors(path: _Path, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None: ...
def write_text_atomic(path: _Path, text: str) -> None: ...
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
