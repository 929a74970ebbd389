"""`make demo`'s pipeline end to end at toy scale: every step through the real CLIs, report written."""

import json

import pytest

from tools.demo import main


@pytest.mark.slow
def test_demo_pipeline_smoke(fmnist, tmp_path):
    out = tmp_path / "demo"
    assert main(["--preset", "smoke", "--out", str(out), "--eval-data", fmnist["test"][0]]) == 0
    results = json.loads((out / "results.json").read_text())
    groups = [r["group"] for r in results["rows"]]
    assert groups == ["labels", "im-pretrain", "task-agnostic", "task-oriented", "teacher"]
    assert all(0.0 <= r["top1_mean"] <= 1.0 and r["runs"] == 1 for r in results["rows"])
    assert (out / "report.png").stat().st_size > 0 and "| Task-oriented, fashion |" in (out / "report.md").read_text()
    # a rerun resumes: every step's output exists, so nothing is trained again
    assert main(["--preset", "smoke", "--out", str(out), "--eval-data", fmnist["test"][0]]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["top1"] for r in again["rows"]] == [r["top1"] for r in results["rows"]]
    assert all(s["cmd"].startswith("kt.teacher_cache.cli") for s in again["steps"])  # only idempotent cache builds
