"""What an adapter is on disk and where one comes from: a directory holding ``adapter_config.json``
and ``adapter.safetensors``, or an entry of a ``.dl`` bundle, written ``"bundle.dl:name"``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter.safetensors"
BUNDLE_SUFFIX = ".dl"


def split_source(source: PathLike, adapter_name: Optional[str] = None) -> tuple[Path, Optional[str]]:
    """Resolve ``source`` into (path, bundle entry). ``"bundle.dl:name"`` names an entry inline."""
    text = os.fspath(source)
    path = Path(text)
    if adapter_name is None and not path.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        if head and tail:
            return Path(head), tail
    return path, adapter_name
