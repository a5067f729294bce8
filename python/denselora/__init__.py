"""DenseLoRA: parameter-efficient fine-tuning with a shared encoder/decoder per module group and one
small dense matrix per layer, ``y = W0 x + s * act(D_g @ M_l @ act(E_g @ x))``.

The package, by concept:

- `denselora.method`: the adapter in PyTorch: its configuration, the branch (reference and
  memory-lean autograd paths), the adapted layer and its injection into a model;
- `denselora.io`: adapter storage (directories, ``.dl`` bundles, the PEFT export) through the Rust core;
- `denselora.kernels`: CPU compute in the Rust core: the fused inference kernel, dropout masks;
- `denselora.algebra`: averaging and rank truncation of saved adapters;
- `denselora.training`: the training loop, its data, evaluation and optimizers;
- `denselora.cli`: the ``denselora`` command line.

The names below are imported on first use, so that the storage commands start without PyTorch.
"""

from . import errors
from ._core import __version__
from ._lazy import attach
from .errors import (
    ChecksumError,
    ConfigError,
    DenseLoRAError,
    FormatError,
    IncompatibleAdapterError,
    NotMergeableError,
)

__getattr__, __dir__, _lazy_names = attach(
    __name__,
    {
        "algebra": ["AverageReport", "FamilyReport", "TruncateReport", "average", "build_family", "truncate"],
        "io.adapter": ["load_adapter", "open_adapter", "save_adapter", "save_adapter_to"],
        "io.bundle": ["Bundle"],
        "method.config": ["DEFAULT_TARGET_MODULES", "DenseLoRAConfig"],
        "method.layer": ["DenseLoRALayer", "DenseLoRAShared"],
        "method.model": ["DenseLoRAModel", "get_denselora_model"],
    },
    # Earlier module paths (bundle, data, evaluation, optim) are handed on too.
    submodules=[
        "algebra", "bundle", "cli", "data", "demo", "evaluation", "io", "kernels", "method", "optim", "pretrained", "training",
    ],
)

__all__ = [
    "ChecksumError",
    "ConfigError",
    "DenseLoRAError",
    "FormatError",
    "IncompatibleAdapterError",
    "NotMergeableError",
    "__version__",
    "errors",
]
__all__ += _lazy_names
del attach, _lazy_names
