"""benches/gpu_check.py, the CUDA check, in its --dry-run mode (CPU, tiny shapes): every section runs,
every check passes, the JSON has the structure a GPU run fills, and a failing check fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("peft")
pytest.importorskip("transformers")

import gpu_check  # noqa: E402  (benches/ is on pytest's pythonpath)

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"correctness", "performance", "train", "routed"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    # A generous budget: CI machines are slow and shared; on a quiet one the run takes about 40 s.
    command = [sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--dry-run", "--budget", "400", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=480, cwd=ROOT)
    return done, json.loads(out.read_text())


def test_dry_run_passes_and_prints_the_tables(dry_run):
    done, data = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert data["status"] == "pass" and data["mode"] == "dry-run" and data["device"] == "cpu"
    assert set(data["sections"]) == SECTIONS
    for name, section in data["sections"].items():
        assert "error" not in section, (name, section.get("traceback"))
        assert section["counts"]["fail"] == section["counts"]["error"] == 0, name
    assert "| section | status | pass | fail | skip | error | seconds (budget) |" in done.stdout
    assert "### Correctness against float64" in done.stdout


def test_every_eager_path_matches_float64_and_is_deterministic(dry_run):
    _, data = dry_run
    section = data["sections"]["correctness"]
    assert section["status"] == "pass"
    items = section["items"]
    for path in ("reference", "efficient"):
        for precision in ("float32", "bf16-autocast"):
            checked = [i for i in items if (i["path"], i["check"], i["precision"]) == (path, "reference", precision)]
            assert sorted(tuple(i["activation"]) for i in checked) == sorted(gpu_check.PAIRS)
            for item in checked:
                assert item["status"] == "pass", item
                assert set(item["errors"]) == {"y", "x", "E", "M", "D"}
                assert max(item["errors"].values()) <= gpu_check.TOLERANCE[precision]
        determinism = [i for i in items if (i["path"], i["check"]) == (path, "determinism")]
        assert len(determinism) == 2 and all(i["status"] == "pass" and i["dropout_acts"] for i in determinism)
    compiled = [i for i in items if i["path"] == "compiled"]
    assert len(compiled) == 2 * 9 + 2 and all(i["status"] == "skip" and "--compile" in i["reason"] for i in compiled)


def test_train_resumes_exactly_through_the_command_line(dry_run):
    _, data = dry_run
    full, resumed = data["sections"]["train"]["items"]
    assert full["status"] == "pass" and full["adapter_moved_after_checkpoint"] and len(full["losses"]) == 6
    assert resumed["status"] == "pass" and resumed["same_losses"] and resumed["unequal_tensors_max_abs_diff"] == {}
    assert resumed["tensors"] > 0 and "--resume" in resumed["command"]


def test_performance_rows_and_ratios(dry_run):
    _, data = dry_run
    section = data["sections"]["performance"]
    assert section["tokens"] == [2, 16] and section["auto_path"] == "efficient"
    assert len(section["models"]) == 2
    for model in section["models"]:
        rows = {r["variant"]: r for r in model["rows"]}
        assert list(rows) == list(gpu_check.VARIANTS)
        assert rows["peft-lora"]["step_time_vs_lora"] == 1.0
        for name, row in rows.items():
            if name.endswith("compiled"):
                assert row["status"] == "skip"
                continue
            assert row["status"] == "pass" and row["step_ms_median"] > 0 and row["reps"] == 2
            assert row["trainable_params"] > 0
        # DenseLoRA trains fewer parameters than LoRA at the same rank.
        assert rows["default-efficient"]["trainable_params"] < rows["peft-lora"]["trainable_params"]


def test_routed_section_waits_for_the_feature(dry_run):
    _, data = dry_run
    section = data["sections"]["routed"]
    if gpu_check.routed_missing() is None:
        assert section["status"] == "pass"
    else:
        assert section["status"] == "skip" and "route" in section["message"]


def test_a_wrong_branch_fails_the_check():
    """The comparison can fail: a scale 10% off is outside both tolerances."""
    case = gpu_check.BranchCase(("gelu", "silu"), gpu_check.BranchShape((2, 3), 8, 6, 2), torch.device("cpu"))
    assert gpu_check.check_against_reference(case, "efficient", "float32")["status"] == "pass"
    _ = case.reference  # computed with the right scale
    case.layer.scaling *= 1.1
    for precision in gpu_check.PRECISIONS:
        item = gpu_check.check_against_reference(case, "reference", precision)
        assert item["status"] == "fail" and item["errors"]["y"] > gpu_check.TOLERANCE[precision]


def test_a_failing_check_gives_a_non_zero_exit_status(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(gpu_check, "TOLERANCE", {"float32": 0.0, "bf16-autocast": 0.0})
    try:
        # The budget counts from the module's import, which may lie minutes back in a whole suite.
        status = gpu_check.main(["--dry-run", "--sections", "correctness", "--budget", "3600", "--out", str(tmp_path / "c.json")])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "c.json").read_text())
    assert status == 1 and data["status"] == "fail" and set(data["sections"]) == {"correctness"}
    assert data["sections"]["correctness"]["counts"]["fail"] > 0
