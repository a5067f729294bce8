"""``.dl`` adapter bundles: many adapters in one memory-mapped, checksummed file.

    with Bundle("adapters.dl") as bundle:
        arrays = bundle.tensors("task-a")      # read-only numpy views of the mapped file

Writers (``pack``, ``save_adapter_to``, ``denselora pack``) of one bundle take turns under an
exclusive lock on ``<bundle>.lock``; readers never lock and keep the file they opened until
``reopen()``.

The format (docs/format.md) is read and written only by the Rust core; this module is its typed
Python face. Opening validates the whole catalog but reads no tensor data; each tensor's checksum
is checked the first time it is fetched, and ``verify()`` checks every byte of the file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np

from .. import _core
from ..errors import ArgumentError
from .sources import PathLike

if TYPE_CHECKING:
    import torch

# No PyTorch at import: the bundle commands of the command line run without it. Tensors go
# through `denselora.io.arrays`, imported where a tensor is asked for or given.

#: A source to pack: an adapter directory, or ``(config, {tensor name: tensor or ndarray})``.
AdapterSource = Union[PathLike, "tuple[Mapping[str, Any], Mapping[str, Any]]"]


class Bundle:
    """An open ``.dl`` bundle.

    ``tensors(name)`` returns arrays that view the memory map without copying; they are read-only
    and keep the map alive on their own, even after ``close()`` or when the ``Bundle`` is gone.
    bfloat16 tensors arrive as ``uint16`` bit patterns (``dtypes(name)`` names the stored dtype).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(os.fspath(path))
        self._core: Optional[_core.Bundle] = _core.Bundle(os.fspath(path))

    # -- lifetime --
    def close(self) -> None:
        """Drop this handle's reference to the map (arrays already handed out stay valid)."""
        self._core = None

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _open(self) -> _core.Bundle:
        if self._core is None:
            raise ArgumentError(f"{self.path}: the bundle is closed")
        return self._core

    def __repr__(self) -> str:
        state = "closed" if self._core is None else f"{len(self._core)} adapters"
        return f"Bundle({os.fspath(self.path)!r}, {state})"

    def reopen(self) -> Bundle:
        """Map the file now at ``path``, to see adapters that writers added or replaced since this
        bundle was opened. Returns ``self``. Arrays already handed out keep viewing the file they
        came from, which stays valid (a writer renames a new file into place, never edits one)."""
        self._core = (self._core.reopen() if self._core is not None else _core.Bundle(os.fspath(self.path)))
        return self

    # -- catalog --
    def names(self) -> list[str]:
        """Adapter names in stored order."""
        return self._open.names()

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._open

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def config(self, name: str) -> dict[str, Any]:
        """The adapter's config (as in its ``adapter_config.json``)."""
        return json.loads(self._open.config_json(name))

    def config_json(self, name: str) -> str:
        """The adapter's config as JSON text (what `config` parses)."""
        return self._open.config_json(name)

    def dtypes(self, name: str) -> dict[str, str]:
        """Stored dtype of each tensor: ``"F32"``, ``"F16"`` or ``"BF16"``."""
        return {t[0]: t[1] for t in self._open.tensor_info(name)}

    def tensor_info(self, name: str) -> list[dict[str, Any]]:
        """Per tensor: name, dtype, shape, offset, length and ``converted_from`` (or None)."""
        keys = ("name", "dtype", "shape", "offset", "length", "converted_from")
        return [dict(zip(keys, t)) for t in self._open.tensor_info(name)]

    def groups(self, name: str) -> list[dict[str, Any]]:
        """Per group: name, in/out features, encoder/decoder rank, number of modules."""
        keys = ("group", "in_features", "out_features", "encoder_rank", "decoder_rank", "modules")
        return [dict(zip(keys, g)) for g in self._open.groups(name)]

    def stats(self) -> dict[str, int]:
        """Sizes: adapters, tensors, blobs, logical_bytes (as if unshared), stored_bytes, file_bytes."""
        return self._open.stats()

    # -- data --
    def tensors(self, name: str, *, verify: bool = True) -> dict[str, np.ndarray]:
        """The adapter's tensors as read-only numpy views of the file (no copy).

        With ``verify`` (the default) each blob's checksum is checked the first time this handle
        hands it out; damaged bytes raise `denselora.errors.ChecksumError`.
        """
        return {k: array for k, (_, array) in self._open.tensors(name, verify).items()}

    def typed_tensors(self, name: str, *, verify: bool = True) -> dict[str, tuple[str, np.ndarray]]:
        """As `tensors`, each array with its stored dtype: ``{tensor name: (dtype, array)}``, the
        dtype as in `dtypes`."""
        return dict(self._open.tensors(name, verify))

    def torch_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors as writable torch tensors (copies, bfloat16 restored)."""
        from . import arrays

        raw = self._open.tensors(name, True)
        return {k: arrays.to_tensor(dtype, np.array(array)) for k, (dtype, array) in raw.items()}

    def verify(self, progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Check every checksum and padding byte; raises ``ChecksumError`` naming damaged tensors."""
        self._open.verify(progress)

    def unpack(
        self, out: PathLike, names: Optional[Iterable[str]] = None, progress: Optional[Callable[[str], None]] = None
    ) -> list[Path]:
        """Write adapters as directories ``out/<name>`` (tensors byte-identical to the stored ones)."""
        written = self._open.unpack(os.fspath(out), list(names or []), progress)
        return [Path(p) for p in written]


def _entry(name: str, source: AdapterSource) -> tuple[str, Any]:
    if isinstance(source, (str, os.PathLike)):
        return name, os.fspath(source)
    if isinstance(source, tuple) and len(source) == 2:
        config, tensors = source
        return name, (json.dumps(dict(config)), {k: _writable(k, t) for k, t in tensors.items()})
    raise ArgumentError(f"adapter {name!r}: source must be an adapter directory or a (config, tensors) pair")


def _writable(name: str, value: Any) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        from . import arrays

        return arrays.to_numpy(value, name)
    return np.ascontiguousarray(value)


def pack(
    dest: PathLike,
    adapters: Union[Mapping[str, AdapterSource], Iterable[tuple[str, AdapterSource]]],
    *,
    dtype: Optional[str] = None,
    keep_existing: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, int]:
    """Write the bundle ``dest`` from ``{name: source}`` (sources: adapter directories or
    ``(config, tensors)`` pairs), streaming and atomically: on failure ``dest`` is untouched.

    ``dtype`` (``"f32"``, ``"f16"``, ``"bf16"``) converts the given adapters' tensors at pack time
    (recorded in the bundle). With ``keep_existing`` the adapters already in ``dest`` stay as stored,
    those of the same name are replaced. Returns sizes: adapters, tensors, deduplicated, logical/stored/file bytes.
    """
    items = adapters.items() if isinstance(adapters, Mapping) else adapters
    entries = [_entry(name, source) for name, source in items]
    return _core.pack_bundle(os.fspath(dest), entries, dtype, keep_existing, progress)


__all__ = ["Bundle", "pack"]
