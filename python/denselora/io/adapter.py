"""Adapters as torch tensors: read from a directory or a bundle entry, written to either. Bytes on
disk are read and written only by the Rust core (`denselora._core`); tensors cross through
`denselora.io.arrays`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import _core
from ..errors import ArgumentError
from . import arrays
from .atomic import atomic_directory
from .bundle import Bundle, pack
from .sources import BUNDLE_SUFFIX, PathLike, split_source


def save_adapter(directory: PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` under ``directory`` (atomically).
    The core validates that tensors and ``config['groups']`` agree before writing."""
    data = arrays.to_numpy_dict(tensors)
    with atomic_directory(directory) as staging:
        _core.save_adapter(os.fspath(staging), json.dumps(dict(config)), data)


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
        return json.loads(config_json), {k: arrays.to_tensor(d, a) for k, (d, a) in raw.items()}
    if not path.exists():
        raise FileNotFoundError(f"{path}: no adapter directory or bundle here")
    return _load_bundle_entry(path, entry)


def _load_bundle_entry(path: Path, entry: Optional[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
    pack(path, {entry: (config, tensors)}, keep_existing=True)
