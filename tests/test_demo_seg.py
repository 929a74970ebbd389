"""`python -m tools.demo --preset seg`: the grid's commands, their order, and the whole pipeline at toy scale."""

from __future__ import annotations

import json
import threading

import pytest

from tools.demo import main as demo_main
from tools.demo_seg import PRESETS, SegDemo


def planned(tmp_path, preset="seg"):
    demo = SegDemo(PRESETS[preset], tmp_path / "out", jobs=2, data_root=tmp_path / "data")
    demo.grid_teacher = lambda: str(tmp_path / "grid-teacher")  # no model built: only the plan is checked
    return demo, demo.plan()


def test_plan_is_the_table(tmp_path):
    demo, cells = planned(tmp_path)
    p = PRESETS["seg"]
    per_budget = 3 + 2 * len(p.transfer_sets)  # teacher, labels, IM-Pretrain; two transfer rows per set
    assert len(cells) == len(p.budgets) * per_budget
    assert all(len(c["runs"]) == len(p.teacher_seeds if c["group"] == "teacher" else p.seeds) for c in cells)
    runs = [r for c in cells for r in c["runs"]]
    assert len(set(runs)) == len(runs)  # no finetune shared between cells
    names = set(demo.graph)
    assert all(a in names for j in demo.graph.values() for a in j.after)
    # task-oriented: finetune <- distillation <- cache <- the first seed's teacher of the same budget
    job = demo.graph["runs/task-composites-n50-s1"]
    assert job.after == ["distill/task-n50-composites"]
    assert demo.graph["distill/task-n50-composites"].after == ["cache/task-n50-composites"]
    assert demo.graph["cache/task-n50-composites"].after == ["runs/teacher-n50-s0"]
    cmd = demo.graph["cache/agnostic-photos"].cmd
    assert cmd[cmd.index("--targets") + 1] == "patches" and cmd[cmd.index("--data") + 1].endswith("photos")
    ft = demo.graph["runs/labels-n200-s2"].cmd
    assert ft[ft.index("--labeled-images") + 1] == "200" and ft[ft.index("--subset-seed") + 1] == "2"
    assert "--task" in ft and ft[ft.index("--task") + 1] == "segmentation"
    # scratch students finetune at the scratch lr; distilled inits at the pretrained-init lr, like IM-Pretrain
    lr = {n: demo.graph[n].cmd[demo.graph[n].cmd.index("--lr") + 1] for n in
          ("runs/labels-n50-s0", "runs/task-photos-n50-s0", "runs/agnostic-composites-n200-s1",
           "runs/im-pretrain-n50-s0")}
    assert lr == {"runs/labels-n50-s0": str(p.lr), "runs/task-photos-n50-s0": str(p.distilled_lr),
                  "runs/agnostic-composites-n200-s1": str(p.distilled_lr), "runs/im-pretrain-n50-s0": str(p.teacher_lr)}
    assert p.distilled_lr != p.lr
    # the first budget's jobs rank before the second's, whatever the order they were declared in
    assert {demo.graph[r].rank for c in cells if c["labeled_images"] == p.budgets[0] for r in c["runs"]} == {0}
    assert demo.graph["runs/teacher-n200-s0"].rank == demo.graph["runs/labels-n200-s0"].rank == 1


def test_execute_respects_dependencies_and_resumes(tmp_path, monkeypatch):
    demo, _ = planned(tmp_path)
    demo.jobs = 1  # one at a time: the start order is the priority order
    started, lock = [], threading.Lock()

    def fake_run(job):
        with lock:
            assert all(a in started for a in job.after)
            started.append(job.name)
        job.done.parent.mkdir(parents=True, exist_ok=True)
        job.done.write_text("{}")

    monkeypatch.setattr(demo, "run_job", fake_run)
    demo.execute()
    assert sorted(started) == sorted(demo.graph)
    # teachers, caches and distillations first: the finetunes wait on them
    assert all(demo.graph[n].first for n in started[:2])
    for rank in (0, 1):  # budget by budget, seed by seed: an interrupted demo has a run in every cell first
        seeds = [demo.graph[n].seed for n in started if demo.graph[n].rank == rank and not demo.graph[n].first]
        assert seeds == sorted(seeds) and len(set(seeds)) == 3
    assert [demo.graph[n].rank for n in started] == sorted(demo.graph[n].rank for n in started)
    started.clear()
    demo.execute()  # everything done: nothing runs again
    assert started == []


def test_codec_rows_distill_the_first_budget_from_caches_in_each_codec(tmp_path):
    from dataclasses import replace

    demo = SegDemo(replace(PRESETS["seg"], codecs=["fp16", "pixel-topk:k=3"]), tmp_path / "out", jobs=2,
                   data_root=tmp_path / "data")
    demo.grid_teacher = lambda: str(tmp_path / "grid-teacher")
    cells = [c for c in demo.plan() if "codec" in c["row"]]
    assert [(c["row"], c["transfer"], c["labeled_images"], len(c["runs"])) for c in cells] == [
        ("Task-oriented, cache codec fp16", "composites", 50, 3),
        ("Task-oriented, cache codec pixel-topk:k=3", "composites", 50, 3)]
    build = demo.graph["cache/task-n50-composites-fp16"]
    assert build.after == ["runs/teacher-n50-s0"]
    assert build.cmd[build.cmd.index("--codec") + 1] == "seg_logits=fp16"
    assert "--codec" not in demo.graph["cache/task-n50-composites"].cmd  # the main row: build's default codec
    assert demo.graph["runs/task-n50-composites-pixel-topk-k3-s2"].after == ["distill/task-n50-composites-pixel-topk-k3"]
    # every student row has the preset's student head width (distilled ones through --init)
    for name in ("distill/task-n50-composites-fp16", "runs/labels-n200-s0"):
        cmd = demo.graph[name].cmd
        assert cmd[cmd.index("--head-width") + 1] == str(PRESETS["seg"].student_head_width)


@pytest.mark.slow
def test_seg_smoke_end_to_end(tmp_path):
    out = tmp_path / "seg"
    assert demo_main(["--preset", "seg-smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    groups = [(r["group"], r["transfer"]) for r in results["rows"]]
    assert groups == [("teacher", ""), ("labels", ""), ("im-pretrain", ""), ("task-agnostic", "photos"),
                      ("task-oriented", "photos"), ("task-agnostic", "composites"), ("task-oriented", "composites")]
    assert all(0.0 <= r["miou_mean"] <= 1.0 and r["runs"] == 1 for r in results["rows"])
    report = (out / "report.md").read_text()
    assert "task-related transfer (composites)" in report and (out / "report.png").stat().st_size > 0
    assert "What the scratch student needed here: garments 0.5-0.9" in report  # the issue asks the report to say
    # a rerun resumes: every step's output exists, nothing runs again
    assert demo_main(["--preset", "seg-smoke", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == []
