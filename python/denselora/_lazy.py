"""Names that a package hands on from its submodules, imported on first use (PEP 562), so that
``import denselora`` and the commands that need no PyTorch start without importing it."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Mapping


def attach(
    package: str, exports: Mapping[str, Iterable[str]], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``. ``exports`` maps a submodule (relative
    to the package) to the names it hands on; ``submodules`` are handed on as modules."""
    origin = {name: module for module, names in exports.items() for name in names}
    modules = set(submodules)

    def __getattr__(name: str) -> Any:
        if name in origin:
            value = getattr(importlib.import_module(f"{package}.{origin[name]}"), name)
        elif name in modules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(origin) | modules)

    return __getattr__, __dir__, sorted(origin)
