"""The README's set-up commands are the ones CI and users run, its links lead somewhere, and its
formula is the default configuration's."""

import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command and "cargo test" in ci_command
    assert f"\n{ci_command}\n" in readme


def test_readme_shows_the_main_job():
    assert "denselora demo" in (ROOT / "README.md").read_text()


def test_readme_links_to_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+://|#", t)]
    assert any(t.startswith("docs/") for t in targets), "the README links to no page under docs/"
    missing = [t for t in targets if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_formula_states_the_default_and_the_paper_scaling():
    from denselora import DenseLoRAConfig

    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks as spaces
    default, paper = DenseLoRAConfig(r=16, alpha=32), DenseLoRAConfig.paper(r=16, alpha=32)
    assert default.is_linear and math.isclose(default.scale, 32 / math.sqrt(16))
    assert paper.activations == ("gelu", "gelu") and math.isclose(paper.scale, 32 / 16)
    assert f'`s = alpha / sqrt(r)` (`scaling="{default.scaling}"`)' in readme
    assert f'`s = alpha / r` (`scaling="{paper.scaling}"`)' in readme
