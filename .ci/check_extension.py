"""Smoke test of an installed wheel's extension, needing numpy only (no torch).

For platforms and Python versions where the full suite cannot run: loads ``denselora._core``
from the installed package without importing ``denselora`` itself (which imports torch), checks
the fused kernel against numpy on every instruction set this CPU offers, and an atomic overwrite.
"""

import importlib.machinery
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np


def load_core():
    package = importlib.util.find_spec("denselora")
    if package is None or not package.submodule_search_locations:
        sys.exit("denselora is not installed")
    folder = Path(next(iter(package.submodule_search_locations)))
    found = [p for s in importlib.machinery.EXTENSION_SUFFIXES for p in folder.glob(f"_core{s}")]
    if not found:
        sys.exit(f"no compiled denselora._core in {folder}")
    spec = importlib.util.spec_from_file_location("denselora._core", found[0])
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    return core, found[0]


def main() -> None:
    core, path = load_core()
    print(f"denselora._core {core.__version__} from {path}, Python {sys.version.split()[0]}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 24), dtype=np.float32)
    e = rng.standard_normal((4, 24), dtype=np.float32)
    m = rng.standard_normal((4, 4), dtype=np.float32)
    d = rng.standard_normal((16, 4), dtype=np.float32)
    expected = 0.5 * (x.astype(np.float64) @ e.T @ m.T @ d.T)
    for isa in core.kernel_available_isas():
        core.kernel_set_isa(isa)
        out = np.zeros((5, 16), dtype=np.float32)
        core.dense_branch(
            x, e, m, d, out, scale=0.5, encoder_activation="identity", decoder_activation="identity", num_threads=2
        )
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=isa)
        print(f"kernel {isa}: matches numpy")
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "config.json"
        core.write_text_atomic(target, "first")
        core.write_text_atomic(target, "second")
        assert target.read_text() == "second" and [p.name for p in Path(folder).iterdir()] == ["config.json"]
    print("atomic overwrite: ok")


if __name__ == "__main__":
    main()
