"""The extension's type stubs (`denselora/_core.pyi`) match the extension itself: every name, class,
signature and default, checked by mypy's stubtest against the extension that this suite imports
(the source tree's build, or the installed wheel in CI's wheel run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy.stubtest")


def test_stub_matches_the_extension(tmp_path):
    import denselora

    # Run from the folder that holds the imported package, so that mypy (which reads its stubs from
    # the folder it runs in) and the runtime import (cwd is on sys.path with -m) see the same copy.
    where = Path(denselora.__file__).resolve().parent.parent
    env = {**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "mypy_cache")}
    env.pop("MYPYPATH", None)
    # No allowlist: every difference stubtest reports is a stub to fix.
    command = [sys.executable, "-m", "mypy.stubtest", "denselora._core"]
    done = subprocess.run(command, cwd=where, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
