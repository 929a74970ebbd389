"""kt-recipe: a run equals the single commands run by hand; a killed recipe continues; a changed one is refused in
one line naming the field; bad recipes are one line, exit 2; stages run once, after what they need."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from kt.recipe.cli import main

ROOT = Path(__file__).resolve().parent.parent


def tiny(fmnist, out: Path, **changes) -> dict:
    """A recipe of every stage kind but retrieval, at toy scale on the fmnist fixture (300 train, 100 test)."""
    recipe = {
        "out": str(out),
        "data": {"labeled": str(fmnist["root"] / "train"), "test": str(fmnist["root"] / "test"),
                 "transfer": {"fm": str(fmnist["root"] / "train" / "train-{000000..000001}.tar")}},
        "budgets": [2],
        "seeds": [0],
        "teacher": {"model": "test_efficientnet", "image_size": 32,
                    "finetune": {"epochs": 1, "batch_size": 8, "workers": 0}},
        "cache": {"views": 1, "batch_size": 32, "workers": 0},
        "students": [{"model": "test_vit", "image_size": 32, "objectives": ["task"], "evaluate_distilled": ["task"]}],
        "distill": {"epochs": 1, "batch_size": 16, "workers": 0},
        "finetune": {"epochs": 1, "batch_size": 8, "workers": 0},
        "eval": {"workers": 0},
    }
    for path, value in changes.items():  # "teacher__finetune__lr": 0.1 sets recipe["teacher"]["finetune"]["lr"]
        *head, last = path.split("__")
        node = recipe
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return recipe


def write(path: Path, recipe: dict) -> str:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "checkpoint" / "model.safetensors")), load_file(str(b / "checkpoint" / "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert (x[k] == y[k]).all(), (a, k)


@pytest.mark.slow
def test_a_recipe_run_equals_the_single_commands_run_by_hand(fmnist, tmp_path, capsys):
    from kt.student.cli import main as student
    from kt.teacher_cache.cli import main as cache

    out, hand = tmp_path / "out", tmp_path / "hand"
    # the cache build under a launcher (a subprocess: `python -m kt.teacher_cache.cli build ...`), the rest in process
    path = write(tmp_path / "r.yaml", tiny(fmnist, out, launcher="python", launch=["cache"]))
    assert main(["run", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and all("ran in" in line for line in lines[:6])  # one line per stage, then the report

    train, test = str(fmnist["root"] / "train"), str(fmnist["root"] / "test")
    spec = str(fmnist["root"] / "train" / "train-{000000..000001}.tar")
    subset = ["--data", train, "--val-data", test, "--labels-per-class", "2", "--subset-seed", "0", "--seed", "0",
              "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    assert student(["finetune", "--model", "test_efficientnet", *subset, "--out", str(hand / "teacher")]) == 0
    assert cache(["build", "--teacher", str(hand / "teacher"), "--data", spec, "--targets", "logits", "--image-size",
                  "32", "--views", "1", "--batch-size", "32", "--workers", "0", "--out", str(hand / "c.zarr")]) == 0
    assert student(["train", "--model", "test_vit", "--cache", str(hand / "c.zarr"), "--data", spec, "--objective",
                    "task", "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--workers", "0",
                    "--out", str(hand / "distill")]) == 0
    assert student(["finetune", "--model", "test_vit", "--init", str(hand / "distill"), *subset,
                    "--out", str(hand / "task")]) == 0
    assert student(["finetune", "--model", "test_vit", *subset, "--out", str(hand / "labels")]) == 0
    capsys.readouterr()
    assert student(["eval", "--checkpoint", str(hand / "distill"), "--data", test, "--workers", "0"]) == 0
    as_distilled = json.loads(capsys.readouterr().out)

    same_weights(out / "teacher" / "n2-s0", hand / "teacher")
    same_weights(out / "distill" / "test-vit-task-n2-fm", hand / "distill")
    for recipe_run, hand_run in (("runs/test-vit-task-fm-n2-s0", "task"), ("runs/test-vit-labels-n2-s0", "labels"),
                                 ("teacher/n2-s0", "teacher")):
        same_weights(out / recipe_run, hand / hand_run)
        assert json.loads((out / recipe_run / "eval.json").read_text()) == \
            json.loads((hand / hand_run / "eval.json").read_text())
    assert json.loads((out / "eval" / "test-vit-task-n2-fm" / "eval.json").read_text()) == as_distilled

    results = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in results["rows"]}
    assert list(rows) == ["labels only (random init)", "task-oriented", "task-oriented, as distilled (no finetuning)",
                          "teacher (test_efficientnet, finetuned)"]
    assert rows["task-oriented, as distilled (no finetuning)"]["top1_mean"] == as_distilled["top1"]
    assert not results["missing"] and (out / "report.png").stat().st_size > 0
    assert "| task-oriented | " in (out / "report.md").read_text()

    # a rerun runs nothing: every stage finished with this recipe
    records = (out / "stages.json").read_text()
    assert main(["run", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all("done before" in line for line in lines[:6]) and (out / "stages.json").read_text() == records


@pytest.mark.slow
def test_a_killed_stage_continues_and_a_changed_recipe_is_refused(fmnist, tmp_path, capsys):
    from kt.student.cli import main as student

    out = tmp_path / "out"
    recipe = tiny(fmnist, out, teacher__finetune__epochs=2)
    killed = copy.deepcopy(recipe)
    killed["teacher"]["finetune"]["stop_after_steps"] = 1  # as if killed after its first step (a resumable field)
    assert main(["run", write(tmp_path / "r.yaml", killed), "--only", "teacher/*"]) == 0
    assert not (out / "teacher" / "n2-s0" / "eval.json").exists()
    path = write(tmp_path / "r.yaml", recipe)
    # a field of a stage that ran: refused, whatever the stage's state, before anything runs
    changed = copy.deepcopy(recipe)
    changed["teacher"]["finetune"]["lr"] = 0.01
    capsys.readouterr()
    assert main(["run", write(tmp_path / "changed.yaml", changed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.finetune.lr changed (0.001 when stage teacher/n2-s0 ran, 0.01 now)" in err[0]
    assert not (out / "cache").exists()
    # the same recipe again: the stage continues where it stopped and ends as an uninterrupted run
    assert main(["run", path, "--only", "teacher/*"]) == 0
    assert "resuming at epoch 0, batch 1, step 1" in (out / "logs" / "teacher--n2-s0.log").read_text()
    assert student(["finetune", "--model", "test_efficientnet", "--data", str(fmnist["root"] / "train"),
                    "--val-data", str(fmnist["root"] / "test"), "--labels-per-class", "2", "--subset-seed", "0",
                    "--seed", "0", "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--workers", "0",
                    "--out", str(tmp_path / "hand")]) == 0
    same_weights(out / "teacher" / "n2-s0", tmp_path / "hand")
    # a command's default that changed since a stage ran is named as such
    records = json.loads((out / "stages.json").read_text())
    records["teacher/n2-s0"]["identity"]["weight_decay"] = 0.5
    (out / "stages.json").write_text(json.dumps(records))
    capsys.readouterr()
    assert main(["plan", path]) == 0  # plan reads, refuses nothing
    assert main(["run", path]) == 2
    assert "the default of kt-student finetune --weight-decay changed (0.5 when" in capsys.readouterr().err


def bad(fmnist, tmp_path, **changes) -> str:
    return write(tmp_path / "bad.yaml", tiny(fmnist, tmp_path / "out", **changes))


@pytest.mark.parametrize("changes, message", [
    ({"studnets": []}, "studnets: unknown field (valid: out, task"),
    ({"students__0__distil": {}}, "students[0].distil: unknown field"),
    ({"finetune__epoch": 3}, "finetune.epoch: not a field of kt-student finetune (valid: "),
    ({"distill__model": "x"}, "distill.model: set by the recipe itself, not in a distill block"),
    ({"teacher__finetune__epochs": 0}, "teacher.finetune.epochs 0: must be >= 1"),
    ({"finetune__lr": "fast"}, "finetune.lr: expected a number, got 'fast'"),
    ({"finetune__by_budget": {5: {"epochs": 2}}}, "finetune.by_budget: 5 is not one of the budgets [2]"),
    ({"cache__by_budget": {2: {"views": 2}}}, "cache.by_budget: by_budget is for finetune blocks"),
    ({"data__labeled": "/nonexistent/shards"}, "data.labeled: shard not found: /nonexistent/shards (and no prepare"),
    ({"teacher__pool": "/nonexistent/pool"}, "teacher.pool: shard not found: /nonexistent/pool (and no prepare"),
    ({"teacher__pool_size": -1}, "teacher.pool_size"),
    ({"teacher": None}, "students[0].objectives: a distillation reads a teacher's cache, and the recipe has no teacher"),
    ({"students__0__objectives": ["embedding-contrastive"]}, "students[0].evaluate_distilled: no stage distills task"),
    ({"students__0__curve": {"points": [{"transfer": "web"}]}}, "students[0].curve.points[0].transfer: no transfer "
                                                                 "set named 'web' (data.transfer has fm)"),
    ({"data__transfer": {"c": {"curate": {"size": 10}}}}, "data.transfer.c: a curated set needs the retrieval"),
    ({"task": "segmentation", "students__0__image_size": 36, "teacher__image_size": 40},
     "students[0].image_size: image size 36 is not divisible by the output stride 8"),
    ({"task": "segmentation", "students__0__objectives": ["embedding-contrastive"],
      "students__0__evaluate_distilled": []},
     "students[0].objectives: unknown objective 'embedding-contrastive' for task segmentation"),
])
def test_bad_recipes_are_one_line_exit_2(fmnist, tmp_path, capsys, changes, message):
    assert main(["plan", bad(fmnist, tmp_path, **changes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_other_classes_in_the_test_set_are_refused(fmnist, tmp_path, capsys):
    import shutil

    other = tmp_path / "test"
    shutil.copytree(fmnist["root"] / "test", other)
    names = json.loads((other / "classes.json").read_text())
    (other / "classes.json").write_text(json.dumps(names[::-1]))
    assert main(["plan", bad(fmnist, tmp_path, data__test=str(other))]) == 2
    assert "data.test names other classes than data.labeled" in capsys.readouterr().err
    assert main(["run", bad(fmnist, tmp_path), "--only", "nothing/*"]) == 2
    assert "--only nothing/* matches no stage" in capsys.readouterr().err


def test_every_shipped_recipe_plans(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # recipes name paths from the repository root
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert {r.stem for r in recipes} >= {"demo", "full", "retrieval", "finetune", "paper", "seg", "smoke"}
    for recipe in recipes:
        assert main(["plan", str(recipe)]) == 0, recipe
    assert "kt-student train --model" in capsys.readouterr().out


def test_stages_run_after_what_they_need_once_each_and_the_report_reads_what_finished(fmnist, tmp_path, monkeypatch,
                                                                                      capsys):
    """Two jobs at a time: each stage starts once the stages it needs have finished; a rerun starts none. The
    report averages the eval.json of the runs that finished and lists the others."""
    import threading

    from kt.recipe import runner
    from kt.recipe.plan import load_plan

    recipe = tiny(fmnist, tmp_path / "out", seeds=[0, 1, 2], jobs=2,
                  students__0__objectives=["task", "embedding-contrastive"])
    plan = load_plan(write(tmp_path / "r.yaml", recipe))
    started, finished, lock = [], set(), threading.Lock()

    def fake(stage, plan, verbose=False):
        with lock:
            assert all(n in finished for n in stage.needs), stage.name
            started.append(stage.name)
        stage.marker.parent.mkdir(parents=True, exist_ok=True)
        top1 = 0.5 + 0.1 * int(stage.name[-1]) if stage.name.startswith("runs/") else 0.25
        stage.marker.write_text(json.dumps({"top1": top1}))
        with lock:
            finished.add(stage.name)

    monkeypatch.setattr(runner, "execute", fake)
    assert main(["run", plan.path.as_posix()]) == 0
    assert sorted(started) == sorted(plan.stages) and len(started) == len(set(started))
    started.clear()
    assert main(["run", plan.path.as_posix()]) == 0
    assert started == []
    rows = {r["row"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert rows["labels only (random init)"]["top1"] == [0.5, 0.6, 0.7]
    assert abs(rows["task-agnostic (embedding-contrastive)"]["top1_mean"] - 0.6) < 1e-12

    (tmp_path / "out" / "runs" / "test-vit-labels-n2-s2" / "eval.json").unlink()
    assert main(["report", plan.path.as_posix()]) == 0
    report = capsys.readouterr().out
    assert "| labels only (random init) | 55.00 ± 7.07 (2) |" in report
    assert "## Not finished" in report and "labels only (random init) @ 2 labels/class: 1 run(s)" in report

    # the teacher removed (to run again): what was made from the old one is refused by name, before anything runs
    import shutil

    shutil.rmtree(tmp_path / "out" / "teacher")
    assert main(["run", plan.path.as_posix()]) == 2
    assert "stage cache/task-n2-fm was made from an earlier run of teacher/n2-s0, which has run again since (or " \
           "will: its output is gone)" in capsys.readouterr().err
    assert started == []


def test_a_teacher_pool_is_one_teacher_for_every_budget(fmnist, tmp_path):
    """`teacher.pool`: the teacher finetunes on the pool (pool_size of it, seeded as a budget's subset), not on a
    budget's labels: one teacher stage, one task cache and one distillation serve every budget."""
    from kt.recipe.plan import load_plan

    pool = str(fmnist["root"] / "train" / "train-000002.tar")
    plan = load_plan(write(tmp_path / "r.yaml", tiny(fmnist, tmp_path / "out", budgets=[2, 3],
                                                     teacher__pool=pool, teacher__pool_size=7)))
    teachers = [s for s in plan.stages.values() if s.name.startswith("teacher/")]
    assert [t.name for t in teachers] == ["teacher/pool7-s0"]
    argv = teachers[0].argv()
    assert argv[argv.index("--data") + 1] == pool and argv[argv.index("--labels-per-class") + 1] == "7"
    assert len([s for s in plan.stages.values() if s.kind == "cache"]) == 1
    distills = [s.name for s in plan.stages.values() if s.kind == "distill"]
    assert len(distills) == 1 and plan.stages[distills[0]].needs == ["cache/task-pool7-fm"]
    students = [s for s in plan.stages.values() if s.name.startswith("runs/") and "task" in s.name]
    assert sorted(s.argv()[s.argv().index("--labels-per-class") + 1] for s in students) == ["2", "3"]
    assert all(s.needs == distills for s in students)
    # the whole pool when pool_size is 0
    plan = load_plan(write(tmp_path / "r.yaml", tiny(fmnist, tmp_path / "out", teacher__pool=pool)))
    argv = plan.stages["teacher/pool-s0"].argv()
    assert argv[argv.index("--labels-per-class") + 1] == "none" and argv[argv.index("--data") + 1] == pool
