"""The documentation site builds with warnings as errors: broken links and anchors between pages,
missing snippets, and docstrings that the API pages cannot parse all fail the build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' (the test extra has it too)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # the theme's notice about MkDocs 2, not a build warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT,  # README.md snippets are resolved from the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, log

    # The API pages were generated from the docstrings, and the home page took the README's tour.
    api = (site / "api" / "method" / "index.html").read_text()
    assert 'id="denselora.method.config.DenseLoRAConfig"' in api
    assert "Configuration of a DenseLoRA adapter." in api
    home = (site / "index.html").read_text()
    assert "get_denselora_model" in home and "--8&lt;--" not in home and "--8<--" not in home
