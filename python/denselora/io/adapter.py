"""Adapters as torch tensors: read from a directory or a bundle entry, written to either. Bytes on
disk are read and written only by the Rust core (`denselora._core`); tensors cross through
`denselora.io.arrays`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from .. import _core
from ..errors import ArgumentError
from . import arrays
from .atomic import atomic_directory
from .bundle import pack
from .sources import BUNDLE_SUFFIX, PathLike, split_source


def save_adapter(directory: PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` under ``directory`` (atomically).
    The core validates that tensors and ``config['groups']`` agree before writing."""
    data = arrays.to_numpy_dict(tensors)
    with atomic_directory(directory) as staging:
        _core.save_adapter(os.fspath(staging), json.dumps(dict(config)), data)


@dataclass(frozen=True)
class GroupLayout:
    """One group of an adapter as the core validated it: the shape every module of the group has
    (``in_features`` -> ``out_features``), the latent widths and the group's module paths."""

    name: str
    in_features: int
    out_features: int
    encoder_rank: int
    decoder_rank: int
    modules: tuple[str, ...]


def _layouts(rows: Iterable[tuple[str, int, int, int, int, list[str]]]) -> dict[str, GroupLayout]:
    return {row[0]: GroupLayout(*row[:5], tuple(row[5])) for row in rows}


@dataclass(frozen=True)
class OpenedAdapter:
    """An adapter opened by the core: its config, its validated group layouts, and its tensors as
    ``(dtype name, read-only array)`` viewing the memory-mapped file (bfloat16 as ``uint16`` bits;
    the arrays keep the map alive on their own). ``where`` names it: the directory or
    ``bundle.dl:name``."""

    config: dict[str, Any]
    groups: dict[str, GroupLayout]
    arrays: dict[str, tuple[str, np.ndarray]]
    where: str

    def torch_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as writable torch tensors (copies, independent of the map)."""
        return {k: arrays.to_tensor(dtype, np.array(a)) for k, (dtype, a) in self.arrays.items()}


def open_adapter(source: PathLike, adapter_name: Optional[str] = None) -> OpenedAdapter:
    """Open an adapter directory or bundle entry through the core, the same way for both:
    memory-mapped and validated once (config, layout, checksums of a bundle entry's blobs).

    ``source`` is a directory, a bundle with ``adapter_name`` (or without, when it holds one
    adapter), or ``"bundle.dl:name"``."""
    path, entry = split_source(source, adapter_name)
    config_json, groups, raw = _core.open_adapter(os.fspath(path), entry)
    where = os.fspath(path) if entry is None else f"{os.fspath(path)}:{entry}"
    return OpenedAdapter(json.loads(config_json), _layouts(groups), raw, where)


def adapter_layout(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str = "adapter") -> dict[str, GroupLayout]:
    """The group layouts of an adapter held in memory, after the core checked that ``tensors``
    are exactly what ``config['groups']`` promises (`IncompatibleAdapterError` naming ``source``
    and the module or tensor otherwise)."""
    data = arrays.to_numpy_dict(tensors)
    return _layouts(_core.adapter_layout(json.dumps(dict(config)), data, source))


def load_adapter(source: PathLike, adapter_name: Optional[str] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter from a directory or a bundle entry: ``(config dict, {name: tensor})``; the
    tensors are writable copies.

    Directories and bundle entries are interchangeable: ``load_adapter("runs/a")``,
    ``load_adapter("all.dl", "a")`` and ``load_adapter("all.dl:a")`` all work.
    """
    opened = open_adapter(source, adapter_name)
    return opened.config, opened.torch_tensors()


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
