"""The demos as recipes (recipes/*.yaml): `make demo` runs the commands that measured its figures; the paper grid
plans as its preset ran; the labeled-subset maker gives every run its subset; a paper-shaped recipe runs every
row end to end at toy scale and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kt.recipe.cli import main

ROOT = Path(__file__).resolve().parent.parent
D, R = "data/fashion-mnist", "runs/demo"
FT = f"--data {D}/train --val-data {D}/test --labels-per-class 10"
SET = f"'{D}/train/train-{{000000..000002}}.tar'"
# What `make demo` runs: the commands of its measured figures (docs/results.md, "make demo with the issue-22
# defaults"). The distillations and the cache take the commands' defaults (light views, lr 1e-2, warm-up 0.1) and the
# finetunes from a task-distilled student `--train auto` (the head alone), as a user's commands would.
DEMO = [
    f"kt-student finetune --model tf_efficientnet_lite2 --pretrained package {FT} --subset-seed 0 --seed 0 "
    f"--image-size 48 --epochs 30 --batch-size 32 --lr 0.002 --out {R}/teacher/n10-s0",
    *[f"kt-student finetune --model mobilevitv2_050 {FT} --subset-seed {s} --seed {s} --image-size 32 --epochs 30 "
      f"--batch-size 32 --lr 0.002 --out {R}/runs/mobilevitv2-050-labels-n10-s{s}" for s in range(3)],
    *[f"kt-student finetune --model tf_efficientnet_lite0 --pretrained package {FT} --subset-seed {s} --seed {s} "
      f"--image-size 32 --epochs 30 --batch-size 32 --lr 0.002 --out {R}/runs/im-pretrain-tf-efficientnet-lite0-n10-s{s}"
      for s in range(3)],
    f"kt-cache build --teacher tf_efficientnet_lite2 --pretrained package --data {SET} --targets embedding "
    f"--image-size 48 --views 2 --batch-size 128 --out {R}/cache/features-fashion.zarr",
    f"kt-student train --model mobilevitv2_050 --cache {R}/cache/features-fashion.zarr --data {SET} --objective "
    f"embedding-contrastive --image-size 32 --epochs 4 --batch-size 64 "
    f"--out {R}/distill/mobilevitv2-050-embedding-contrastive-fashion",
    *[f"kt-student finetune --model mobilevitv2_050 --init {R}/distill/mobilevitv2-050-embedding-contrastive-fashion "
      f"{FT} --subset-seed {s} --seed {s} --image-size 32 --epochs 30 --batch-size 32 --lr 0.002 "
      f"--out {R}/runs/mobilevitv2-050-embedding-contrastive-fashion-n10-s{s}" for s in range(3)],
    f"kt-cache build --teacher {R}/teacher/n10-s0 --data {SET} --targets logits --image-size 48 --views 2 "
    f"--batch-size 128 --out {R}/cache/task-n10-fashion.zarr",
    f"kt-student train --model mobilevitv2_050 --cache {R}/cache/task-n10-fashion.zarr --data {SET} --objective task "
    f"--image-size 32 --epochs 4 --batch-size 64 --out {R}/distill/mobilevitv2-050-task-n10-fashion",
    *[f"kt-student finetune --model mobilevitv2_050 --init {R}/distill/mobilevitv2-050-task-n10-fashion {FT} "
      f"--subset-seed {s} --seed {s} --image-size 32 --epochs 30 --batch-size 32 --lr 0.002 "
      f"--out {R}/runs/mobilevitv2-050-task-fashion-n10-s{s}" for s in range(3)],
]


def plan_of(name: str, monkeypatch):
    from kt.recipe.plan import load_plan

    monkeypatch.chdir(ROOT)  # recipes name paths from the repository root
    return load_plan(f"recipes/{name}.yaml")


def test_make_demo_runs_the_commands_of_its_measured_figures(monkeypatch):
    plan = plan_of("demo", monkeypatch)
    assert [s.shell() for s in plan.stages.values() if s.kind != "prepare"] == DEMO
    assert [(r.label, r.group, len(r.runs)) for r in plan.rows] == [
        ("labels only (random init)", "labels", 3), ("IM-Pretrain (tf_efficientnet_lite0)", "im-pretrain", 3),
        ("task-agnostic (embedding-contrastive)", "task-agnostic", 3), ("task-oriented", "task-oriented", 3),
        ("teacher (tf_efficientnet_lite2, finetuned)", "teacher", 1)]


def test_the_paper_grid_plans_as_its_preset_ran(monkeypatch):
    plan = plan_of("paper", monkeypatch)
    stages, rows = plan.stages, plan.rows
    flags = {n: s.values for n, s in stages.items()}
    # every finetune takes its subset from the union of the seeds' subsets, not from the 60,000
    assert {v["data"] for n, v in flags.items() if stages[n].kind == "finetune"} == {"data/fashion-mnist-labeled-50x3"}
    # the teacher: 64 px, 30 epochs at 10 per class, 20 at 50; its variants at 10, one of them the teacher itself
    assert flags["teacher/n10-s0"]["image_size"] == 64 and flags["teacher/n10-s0"]["epochs"] == 30
    assert flags["teacher/n50-s0"]["epochs"] == 20
    variants = [r for r in rows if r.table == "teacher variants"]
    assert len(variants) == 5 and variants[2].runs == ["teacher/n10-s0"]
    assert flags[variants[0].runs[0]]["label_smoothing"] == 0.1 and flags[variants[0].runs[0]]["image_size"] == 48
    assert flags[variants[4].runs[0]]["view"] == "train" and flags[variants[4].runs[0]]["epochs"] == 60
    # one feature cache for every budget and student, holding what both task-agnostic objectives read
    features = [n for n in stages if n.startswith("cache/features")]
    assert features == ["cache/features-fashion-20k"] and flags[features[0]]["targets"] == ["embedding", "patches"]
    # the curve: 4 points, the 20,000 x 2 one being the rows' distillation; the 6,000 one reads the rows' cache;
    # the 60,000 one a cache of its own, and its finetunes are a row of Lite0's table
    curve = [stages[next(n for n in stages[r.runs[0]].needs if n.startswith("distill/"))]
             for r in rows if r.table == "curve"]
    assert [(c.values["data"].rsplit("/", 1)[1], c.identity["epochs"]) for c in curve] == [
        ("train-{000000..000002}.tar", 1), ("train-{000000..000009}.tar", 1), ("train-{000000..000009}.tar", 2),
        ("train-{000000..000029}.tar", 2)]
    assert curve[2].name == "distill/tf-efficientnet-lite0-task-n10-fashion-20k"
    assert curve[0].values["cache"] == curve[1].values["cache"] == str(stages["cache/task-n10-fashion-20k"].out)
    assert flags["cache/task-n10-fashion-60k"]["teacher"] == str(stages["teacher/n10-s0"].out)
    lite0 = [r.label for r in rows if r.table == "student tf_efficientnet_lite0" and r.budget == 10]
    assert lite0 == ["labels only (random init)", "IM-Pretrain (ImageNet weights)", "task-oriented",
                     "task-oriented, as distilled (no finetuning)", "task-agnostic (embedding-contrastive)",
                     "task-agnostic (patch-cosine)", "task-oriented, new head (--init-head new)",
                     "task-oriented, from the curve's fashion-60k x 2 epochs distillation",
                     "teacher (tf_efficientnet_lite2, finetuned)"]
    new_head = next(r for r in rows if "new head" in r.label)
    assert all(flags[n]["init_head"] == "new" for n in new_head.runs)
    mobilevit = [r.label for r in rows if r.table == "student mobilevitv2_050" and r.budget == 50]
    assert "IM-Pretrain (ImageNet weights)" not in mobilevit and len(mobilevit) == 5
    # channels_last on every finetune, build, distillation and evaluation; one worker per distillation
    assert all(v.get("channels_last") for n, v in flags.items() if stages[n].kind != "prepare")
    assert {v["workers"] for n, v in flags.items() if stages[n].kind == "distill"} == {1}


def test_the_subset_maker_gives_each_run_the_subset_of_the_full_set(fmnist, tmp_path):
    """`make_shards subset` (the paper recipe's labeled data, the retrieval recipe's queries): every (budget, seed)
    subset a finetune takes from it is the one it takes from the full set, image for image."""
    from kt.shards import expand_shards, labeled_subset
    from tools.make_shards import make_subset

    union = expand_shards(make_subset(str(fmnist["root"] / "train"), tmp_path / "labeled", 5, [0, 1, 2]))
    full = expand_shards(str(fmnist["root"] / "train"))
    assert sum(1 for _ in labeled_subset(union, None, 0)) < 3 * 5 * 10  # the seeds' subsets overlap
    for budget in (1, 2, 5):
        for seed in (0, 1, 2):
            a, b = labeled_subset(union, budget, seed), labeled_subset(full, budget, seed)
            assert [s.key for s in a] == [s.key for s in b]
            assert all((s.label, s.image.tobytes()) == (t.label, t.image.tobytes()) for s, t in zip(a, b))
    assert json.loads((tmp_path / "labeled" / "classes.json").read_text())[0] == "T-shirt/top"


@pytest.mark.slow
def test_a_paper_shaped_recipe_runs_every_row_and_resumes(fmnist, tmp_path, capsys):
    """Two students, three objectives, teacher variants, an as-distilled evaluation, a variant row and a curve with
    a finetuned point, at toy scale."""
    train = fmnist["root"] / "train"
    recipe = {
        "out": str(tmp_path / "out"),
        "data": {"labeled": str(train), "test": str(fmnist["root"] / "test"), "transfer": {
            "two": {"shards": f"{train}/train-{{000000..000001}}.tar"},
            "one": {"shards": f"{train}/train-000000.tar", "rows": False},
            "three": {"shards": f"{train}/train-{{000000..000002}}.tar", "rows": False}}},
        "budgets": [2, 3], "seeds": [0],
        "teacher": {"model": "test_efficientnet", "image_size": 32,
                    "finetune": {"epochs": 1, "batch_size": 8, "workers": 0, "by_budget": {3: {"epochs": 2}}},
                    "variants": [{"label": "smoothed", "finetune": {"label_smoothing": 0.1}},
                                 {"label": "the teacher"}]},
        "cache": {"views": 1, "batch_size": 32, "workers": 0},
        "students": [
            {"model": "test_efficientnet", "image_size": 32, "evaluate_distilled": ["task"],
             "objectives": ["task", "embedding-contrastive", "patch-cosine"],
             "variants": [{"label": "new head", "budgets": [2], "finetune": {"init_head": "new"}}],
             "curve": {"points": [{"transfer": "one", "cache": "two"}, {"transfer": "three", "finetune": True}]}},
            {"model": "test_vit", "image_size": 32, "objectives": ["task"]}],
        "distill": {"epochs": 1, "batch_size": 16, "workers": 0},
        "finetune": {"epochs": 1, "batch_size": 8, "workers": 0},
        "eval": {"workers": 0},
        "baselines": {"im_pretrain": [{"model": "test_efficientnet", "pretrained": "none", "image_size": 32}]},
    }
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert not results["missing"]
    tables = {}
    for r in results["rows"]:
        tables.setdefault(r["table"], []).append(r)
    assert [r["row"] for r in tables["curve"]] == ["100 images x 1 views x 1 epochs", "300 images x 1 views x 1 epochs"]
    assert [r["row"] for r in tables["teacher variants"]] == ["smoothed", "the teacher"]
    assert tables["teacher variants"][1]["run_dirs"] == ["teacher/n2-s0"]
    lite = [(r["row"], r["budget"], r["runs"]) for r in tables["student test_efficientnet"]]
    assert ("new head", 2, 1) in lite and ("new head", 3, 1) not in lite
    assert ("task-oriented, from the curve's three x 1 epochs distillation", 2, 1) in lite
    assert ("IM-Pretrain (test_efficientnet)", 3, 1) in lite
    assert [r["row"] for r in tables["student test_vit"] if r["budget"] == 3] == [
        "labels only (random init)", "task-oriented", "teacher (test_efficientnet, finetuned)"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Transfer-growth curve" in report and (tmp_path / "out" / "report.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["run", str(path)]) == 0  # finished: a rerun runs nothing
    assert all("done before" in line for line in capsys.readouterr().out.splitlines()[:-1])
