"""recipes/seg.yaml: the segmentation grid's commands and their order, and a segmentation recipe end to end at toy
scale (prepare steps, two stages at a time as subprocesses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from kt.recipe.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_the_seg_recipe_is_the_table(monkeypatch):
    from kt.recipe.plan import load_plan

    monkeypatch.chdir(ROOT)
    plan = load_plan("recipes/seg.yaml")
    stages, rows = plan.stages, plan.rows
    flags = {n: s.values for n, s in stages.items()}
    per_budget = 3 + 2 * 3  # teacher, labels, IM-Pretrain; three transfer rows per transfer set (one a variant)
    assert len([r for r in rows if r.table == "student mobilevitv2_050"]) == 2 * per_budget
    assert all(len(r.runs) == (1 if r.group == "teacher" else 3) for r in rows)
    runs = [n for r in rows for n in r.runs]
    assert len(set(runs)) == len(runs)  # no finetune shared between cells
    # task-oriented: finetune <- distillation <- cache <- the budget's teacher
    finetune = "runs/mobilevitv2-050-task-composites-n50-s1"
    assert "distill/mobilevitv2-050-task-n50-composites" in stages[finetune].needs
    assert "cache/task-n50-composites" in stages["distill/mobilevitv2-050-task-n50-composites"].needs
    assert "teacher/n50-s0" in stages["cache/task-n50-composites"].needs
    assert flags["cache/task-n50-composites"]["targets"] == ["seg_logits"]
    # task-agnostic: the pretrained Lite2 built at the teacher's output stride, its grid cached; one per transfer set
    features = flags["cache/features-photos"]
    assert features["teacher"] == "tf_efficientnet_lite2" and features["pretrained"] == "package"
    assert features["targets"] == ["patches"] and features["output_stride"] == 8
    assert features["data"] == "data/seg-photos-48" and "teacher/n50-s0" not in stages["cache/features-photos"].needs
    # each finetune the steps its preset gave it, in epochs of batches of 16: teacher 200, students 150, IM 120
    for budget in (50, 200):
        per_epoch = max(1, budget // 16)
        for run, steps in ((f"teacher/n{budget}-s0", 200), (f"runs/mobilevitv2-050-labels-n{budget}-s2", 150),
                           (f"runs/mobilevitv2-050-patch-cosine-photos-n{budget}-s0", 150),
                           (f"runs/im-pretrain-tf-efficientnet-lite0-n{budget}-s1", 120)):
            assert flags[run]["epochs"] == math.ceil(steps / per_epoch), run
            assert flags[run]["labeled_images"] == budget and flags[run]["task"] == "segmentation"
    # scratch students at 2e-3; distilled inits, the teacher and IM-Pretrain at 1e-3; every head 128 wide
    lr = {n: flags[n]["lr"] for n in ("runs/mobilevitv2-050-labels-n50-s0", "runs/mobilevitv2-050-task-photos-n50-s0",
                                      "runs/im-pretrain-tf-efficientnet-lite0-n200-s1", "teacher/n50-s0")}
    assert lr == {"runs/mobilevitv2-050-labels-n50-s0": 0.002, "runs/mobilevitv2-050-task-photos-n50-s0": 0.001,
                  "runs/im-pretrain-tf-efficientnet-lite0-n200-s1": 0.001, "teacher/n50-s0": 0.001}
    assert {v["head_width"] for n, v in flags.items() if stages[n].kind in ("finetune", "distill")} == {128}
    assert plan.recipe.jobs == 2
    # the first budget's stages before the second's
    order = list(stages)
    assert max(order.index(n) for n in order if "-n50-" in n) < min(order.index(n) for n in order if "-n200-" in n)


@pytest.mark.slow
def test_a_seg_recipe_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the prepare steps run `python -m tools.make_shards` from the checkout
    data = tmp_path / "data"
    recipe = {
        "out": str(tmp_path / "out"), "task": "segmentation", "jobs": 2,
        "prepare": [
            {"creates": str(data / "seg"), "command": f"python -m tools.make_shards fmnist-seg --out {data / 'seg'} "
                                                      "--train 16 --test 8 --transfer 16 --size 32 --shard-size 8"},
            {"creates": str(data / "photos"), "command": f"python -m tools.make_shards photos --out {data / 'photos'} "
                                                         "--count 16 --size 32 --shard-size 8"}],
        "data": {"labeled": str(data / "seg" / "train"), "test": str(data / "seg" / "test"),
                 "transfer": {"photos": str(data / "photos"), "composites": str(data / "seg" / "transfer")}},
        "budgets": [8], "seeds": [0],
        "teacher": {"model": "test_vit", "image_size": 32,
                    "finetune": {"head_width": 16, "batch_size": 4, "epochs": 1, "workers": 0}},
        "cache": {"views": 1, "batch_size": 8, "workers": 0},
        "students": [{"model": "test_vit", "image_size": 32, "objectives": ["patch-cosine", "task"]}],
        "distill": {"head_width": 16, "epochs": 1, "batch_size": 8, "workers": 0},
        "finetune": {"head_width": 16, "batch_size": 4, "epochs": 1, "workers": 0},
        "baselines": {"im_pretrain": [{"model": "test_vit", "pretrained": "none", "image_size": 32}]},
        "report": {"note": "Numbers meaningless at this scale."},
    }
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # the transfer sets in the order written
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["row"] for r in results["rows"]] == [
        "labels only (random init)", "IM-Pretrain (test_vit)", "task-agnostic (patch-cosine), photos",
        "task-agnostic (patch-cosine), composites", "task-oriented, photos", "task-oriented, composites",
        "teacher (test_vit, finetuned)"]
    assert all(0.0 <= r["miou_mean"] <= 1.0 and r["runs"] == 1 for r in results["rows"]) and not results["missing"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Test mIoU (%)" in report and "Numbers meaningless at this scale." in report
    capsys.readouterr()
    assert main(["run", str(path)]) == 0  # a rerun runs nothing, prepare steps included
    assert all("done before" in line for line in capsys.readouterr().out.splitlines()[:-1])
