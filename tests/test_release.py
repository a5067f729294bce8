"""The release workflow builds wheels exactly as CI builds the wheel it tests."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _maturin_steps(workflow: str) -> list[dict[str, str]]:
    """The `with:` settings of each PyO3/maturin-action step (flat `key: value` lines)."""
    steps = []
    for block in re.split(r"\n\s*- ", workflow):
        if "uses: PyO3/maturin-action@" in block:
            steps.append(dict(re.findall(r"^\s+([\w-]+): (.+?)\s*$", block, flags=re.M)))
    return steps


def test_release_wheels_are_built_with_the_arguments_ci_tests():
    ci = (ROOT / ".ci" / "test-wheel").read_text()
    (ci_args,) = re.findall(r"^maturin build (.+)$", ci, flags=re.M)
    steps = _maturin_steps((ROOT / ".github" / "workflows" / "release.yml").read_text())
    builds = [s for s in steps if s.get("command", "build") == "build"]
    assert builds, "no maturin build step in the release workflow"
    for step in builds:
        assert step.get("args") == ci_args
    assert "--release" in ci_args.split() and "--locked" in ci_args.split()

