"""Adapter storage seen from Python. Bytes on disk are read and written only by the Rust core
(`denselora._core`); this module converts between torch tensors and the core's numpy views and
resolves where an adapter comes from (a directory, or an entry of a ``.dl`` bundle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from . import _core
from .errors import ArgumentError, FormatError

PathLike = Union[str, "os.PathLike[str]"]
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter.safetensors"
BUNDLE_SUFFIX = ".dl"


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous CPU numpy view of ``tensor`` (no copy when it already is one)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in (torch.float32, torch.float16):
        t = t.float()
    return t.contiguous().numpy()


def numpy_to_tensor(dtype: str, array: np.ndarray) -> torch.Tensor:
    """The inverse of the core's ``(dtype, array)`` pairs; bfloat16 arrives as uint16 bits."""
    if dtype == "BF16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def save_adapter(directory: PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` under ``directory`` (atomically,
    file by file). The core validates that tensors and ``config['groups']`` agree before writing."""
    arrays = {name: tensor_to_numpy(t) for name, t in tensors.items()}
    _core.save_adapter(os.fspath(directory), json.dumps(dict(config)), arrays)


def save_peft_lora(directory: PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a PEFT LoRA adapter: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: tensor_to_numpy(t) for name, t in tensors.items()}
    _core.save_safetensors(os.fspath(directory / "adapter_model.safetensors"), arrays, {"format": "pt"})
    _core.write_text_atomic(os.fspath(directory / "adapter_config.json"), json.dumps(dict(config), indent=2) + "\n")


def split_source(source: PathLike, adapter_name: Optional[str] = None) -> tuple[Path, Optional[str]]:
    """Resolve ``source`` into (path, bundle entry). ``"bundle.dl:name"`` names an entry inline."""
    text = os.fspath(source)
    path = Path(text)
    if adapter_name is None and not path.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        if head and tail:
            return Path(head), tail
    return path, adapter_name


def load_adapter(source: PathLike, adapter_name: Optional[str] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter from a directory or a bundle entry: ``(config dict, {name: tensor})``.

    Directories and bundle entries are interchangeable: ``load_adapter("runs/a")``,
    ``load_adapter("all.dl", "a")`` and ``load_adapter("all.dl:a")`` all work.
    """
    path, entry = split_source(source, adapter_name)
    if path.is_dir():
        if entry is not None:
            raise ArgumentError(f"{path} is an adapter directory; adapter_name={entry!r} applies only to bundles")
        config_json, raw = _core.load_adapter(os.fspath(path))
        return json.loads(config_json), {k: numpy_to_tensor(d, a) for k, (d, a) in raw.items()}
    if not path.exists():
        raise FileNotFoundError(f"{path}: no adapter directory or bundle here")
    return _load_bundle_entry(path, entry)


def _load_bundle_entry(path: Path, entry: Optional[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    raise FormatError(f"{path}: not an adapter directory (bundles are not supported by this build)")
