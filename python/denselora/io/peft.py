"""PEFT's LoRA format: what `DenseLoRAModel.export_lora` writes (``adapter_config.json`` and
``adapter_model.safetensors``) for PEFT and LoRA servers to load, and how a PEFT adapter directory
is told apart from a DenseLoRA one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import _core
from . import arrays
from .atomic import atomic_directory
from .sources import CONFIG_FILE, PathLike

TENSORS_FILE = "adapter_model.safetensors"


def save_peft_lora(directory: PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a PEFT LoRA adapter (atomically): ``adapter_config.json`` and ``adapter_model.safetensors``."""
    data = arrays.to_numpy_dict(tensors, dtypes=arrays.WRITABLE_DTYPES)
    with atomic_directory(directory) as staging:
        _core.save_safetensors(os.fspath(staging / TENSORS_FILE), data, {"format": "pt"})
        _core.write_text_atomic(os.fspath(staging / CONFIG_FILE), json.dumps(dict(config), indent=2) + "\n")


def is_peft_lora(path: PathLike) -> bool:
    """Whether ``path`` is a directory holding a PEFT LoRA (its config says ``"peft_type": "LORA"``),
    which PEFT loads, not this library."""
    config_file = Path(os.fspath(path)) / CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == "LORA"
