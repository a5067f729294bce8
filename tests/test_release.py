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



def test_ci_lints_first_and_the_workflow_has_the_linters_tools():
    run = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in run if line and not line.startswith("#")]
    assert commands.index("bash .ci/lint") < commands.index("bash .ci/test-wheel")
    lint = (ROOT / ".ci" / "lint").read_text()
    for command in ("cargo fmt --all --check", "cargo clippy --workspace --all-targets", "-D warnings", "ruff check python tests benches"):
        assert command in lint
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    # Every job that runs a linter installs rustfmt and clippy with the toolchain.
    jobs = re.split(r"\n  (?=[\w-]+:\n)", workflow.split("\njobs:\n", 1)[1])
    linting = [job for job in jobs if "bash .ci/lint" in job or "bash .ci/run" in job]
    assert any("bash .ci/lint" in job for job in linting)
    for job in linting:
        assert re.search(r"components: .*rustfmt", job) and re.search(r"components: .*clippy", job), job
