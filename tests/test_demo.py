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


def test_paper_labeled_shards_give_each_run_the_subset_of_the_full_set(fmnist, tmp_path):
    """The paper preset's finetunes read `OUT/labeled/` (the union of the largest budget's subsets over the seeds)
    instead of scanning the whole training set per run: every (budget, seed) subset taken from it is the one
    taken from the full set, image for image."""
    from kt.shards import expand_shards, labeled_subset
    from tools.demo_paper import PaperDemo, PaperPreset

    preset = PaperPreset(budgets=[2, 5], seeds=[0, 1, 2])
    labeled = PaperDemo(preset, tmp_path, fmnist["root"] / "train", fmnist["test"][0]).labeled()
    union, full = expand_shards(labeled), expand_shards(str(fmnist["root"] / "train"))
    assert sum(1 for _ in labeled_subset(union, None, 0)) < 3 * 5 * 10  # the seeds' subsets overlap
    for budget in (1, 2, 5):
        for seed in preset.seeds:
            a, b = labeled_subset(union, budget, seed), labeled_subset(full, budget, seed)
            assert [s.key for s in a] == [s.key for s in b]
            assert all((s.label, s.image.tobytes()) == (t.label, t.image.tobytes()) for s, t in zip(a, b))


@pytest.mark.slow
def test_paper_preset_smoke_runs_every_row_and_resumes(fmnist, tmp_path):
    out = tmp_path / "paper"
    args = ["--preset", "paper-smoke", "--out", str(out), "--train-data", str(fmnist["root"] / "train"),
            "--eval-data", fmnist["test"][0]]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert not results["missing"]
    tables = {(r["table"], r["row"]) for r in results["rows"]}
    assert ("student test_efficientnet", "task-agnostic (patch-cosine)") in tables
    assert sum(r["table"] == "curve" for r in results["rows"]) == 2
    assert sum(r["table"] == "teacher recipes" for r in results["rows"]) == 2
    # the task-oriented row again from the curve's largest distillation, its 3 seeds finetuned from that run
    curve_row = [r for r in results["rows"] if "the curve's largest" in r["row"]]
    assert len(curve_row) == 1 and curve_row[0]["runs"] == 2
    import yaml

    assert all(yaml.safe_load((out / d / "config.yaml").read_text())["init"].endswith("-curve-2x1")
               for d in curve_row[0]["run_dirs"])
    assert (out / "report.png").stat().st_size > 0 and "Transfer-growth curve" in (out / "report.md").read_text()
    assert main(args + ["--report-only"]) == 0  # nothing missing, nothing run
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["top1"] for r in again["rows"]] == [r["top1"] for r in results["rows"]]
    assert all(s["cmd"].startswith("kt.teacher_cache.cli") for s in again["steps"])
