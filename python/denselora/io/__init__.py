"""Adapter storage: directories, ``.dl`` bundles and the PEFT export, read and written by the Rust core."""

from .adapter import (
    BUNDLE_SUFFIX,
    CONFIG_FILE,
    TENSORS_FILE,
    PathLike,
    load_adapter,
    numpy_to_tensor,
    save_adapter,
    save_adapter_to,
    save_peft_lora,
    split_source,
    tensor_to_numpy,
)
