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

from .. import _core
from ..errors import ArgumentError

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
    from .bundle import Bundle

    with Bundle(path) as bundle:
        if entry is None:
            names = bundle.names()
            if len(names) != 1:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise ArgumentError(
                    f"{path}: the bundle holds {len(names)} adapters ({shown}); name one with "
                    f"adapter_name=... or '{path}:NAME'"
                )
            entry = names[0]
        # Copies: the caller gets ordinary writable tensors, independent of the memory map.
        return bundle.config(entry), bundle.torch_tensors(entry)


def save_adapter_to(
    target: PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    adapter_name: Optional[str] = None,
) -> None:
    """Write an adapter to a directory, or add/replace the entry of a ``.dl`` bundle.

    ``target`` is an adapter directory, ``"bundle.dl:name"``, or a bundle path with
    ``adapter_name``. A bundle is rewritten atomically with its other adapters kept (created when
    missing); on failure the existing file is untouched.
    """
    path, entry = split_source(target, adapter_name)
    if entry is None:
        if path.suffix == BUNDLE_SUFFIX and not path.is_dir():
            raise ArgumentError(f"{path}: writing to a bundle needs an adapter name ('{path}:NAME' or adapter_name=...)")
        save_adapter(path, config, tensors)
        return
    if path.is_dir():
        raise ArgumentError(f"{path} is a directory; adapter_name={entry!r} applies only to bundles")
    from .bundle import pack

    pack(path, {entry: (config, tensors)}, keep_existing=True)
