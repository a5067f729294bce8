"""Run pytest (arguments as for ``python -m pytest``) against the installed denselora.

Refuses to start unless ``denselora`` and its extension import from this interpreter's
site-packages, so that a source tree on ``sys.path`` can never stand in for the installed wheel.
"""

import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path


def main() -> int:
    import denselora
    import denselora._core
    import pytest

    site = Path(sysconfig.get_path("platlib")).resolve()
    for module in (denselora, denselora._core):
        where = Path(module.__file__).resolve()
        if site not in where.parents:
            sys.exit(f"{module.__name__} imports from {where}, not from {site}")
    print(f"denselora {version('denselora')} from {Path(denselora._core.__file__).resolve()}")
    return pytest.main(sys.argv[1:])


# Guarded: tests that spawn processes (torch.multiprocessing) import this file again as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
