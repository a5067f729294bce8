"""Directories written whole or not at all: every save (adapter directories, checkpoints, the
PEFT export, the converted default model) goes through `atomic_directory`."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .sources import PathLike


@contextlib.contextmanager
def atomic_directory(target: PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A new, empty staging folder beside ``target`` to write into. When the block ends without an
    error, what it wrote is renamed into place; otherwise the staging folder is removed and
    ``target`` is left as it was.

    With ``replace`` the staging folder becomes ``target`` as a whole (anything there before is
    removed); without it each entry replaces its namesake inside ``target`` and other files stay
    (a missing ``target`` is created whole). A rename within one file system is atomic, so a reader
    sees each file, or with ``replace`` the whole folder, either as it was or complete.
    """
    target = Path(os.fspath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    staging.mkdir()  # the usual permissions, unlike tempfile.mkdtemp's owner-only ones
    try:
        yield staging
        if replace or not target.exists():
            _rename_over(staging, target)
        else:
            for entry in list(staging.iterdir()):
                _rename_over(entry, target / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a whole rename


def _sibling(path: Path, kind: str) -> Path:
    """A hidden, unused name beside ``path``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{kind}")


def _rename_over(source: Path, dest: Path) -> None:
    """Rename ``source`` to ``dest``. A folder at ``dest`` cannot be renamed over, so it is renamed
    aside first and removed after."""
    if dest.is_dir() and not dest.is_symlink():
        aside = _sibling(dest, "old")
        os.rename(dest, aside)
        os.rename(source, dest)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(source, dest)
