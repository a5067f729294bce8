"""DenseLoRA: parameter-efficient fine-tuning with a shared encoder/decoder per module group and one
small dense matrix per layer, ``y = W0 x + s * act(D_g @ M_l @ act(E_g @ x))``."""

from . import errors
from ._core import __version__
from .algebra import AverageReport, TruncateReport, average, truncate
from .io.bundle import Bundle
from .method.config import DEFAULT_TARGET_MODULES, DenseLoRAConfig
from .errors import (
    ChecksumError,
    ConfigError,
    DenseLoRAError,
    FormatError,
    IncompatibleAdapterError,
    NotMergeableError,
)
from .io import load_adapter, save_adapter, save_adapter_to
from .method.layer import DenseLoRALayer, DenseLoRAShared
from .method.model import DenseLoRAModel, get_denselora_model

__all__ = [
    "Bundle",
    "DEFAULT_TARGET_MODULES",
    "ChecksumError",
    "ConfigError",
    "DenseLoRAConfig",
    "DenseLoRAError",
    "DenseLoRALayer",
    "DenseLoRAModel",
    "DenseLoRAShared",
    "FormatError",
    "IncompatibleAdapterError",
    "NotMergeableError",
    "AverageReport",
    "TruncateReport",
    "__version__",
    "average",
    "errors",
    "get_denselora_model",
    "load_adapter",
    "save_adapter",
    "save_adapter_to",
    "truncate",
]
