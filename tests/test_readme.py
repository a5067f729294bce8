"""The README's set-up commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command and "cargo test" in ci_command
    assert f"\n{ci_command}\n" in readme


def test_readme_shows_the_main_job():
    assert "denselora demo" in (ROOT / "README.md").read_text()
