"""How fast a distilled student converges toward its teacher: one measured run per setting, through the real commands.

    python -m tools.convergence run --out runs/conv --teacher runs/conv/teacher500 \
        --transfer 'data/fashion-mnist/train/train-{000000..000009}.tar' --test data/fashion-mnist/test \
        --name base --cache '--view-spec train --views 1' \
        --train '--model tf_efficientnet_lite0 --image-size 32 --epochs 2 --lr 2e-3 --warmup-epochs 0.1'
    python -m tools.convergence report --out runs/conv          # table (+ plot) of every finished run

A run builds its cache (`kt-cache build`, once per distinct set of cache flags, under OUT/cache/), distils the
student from it (`kt-student train`), then evaluates the student as distilled on the test shards: top-1, and its
agreement with the teacher there (the teacher's own test predictions, computed once, at the teacher's size; the
student's at its own). It records what the run cost: the samples the student saw, the process CPU time of the
build and of the distillation (this process and its DataLoader workers: `resource.getrusage`, so a figure taken
beside other work stays close to the quiet one, unlike wall time) and the wall time. One JSON line a run in
OUT/results.jsonl; a run whose line exists is skipped, so a killed grid resumes.

The agreement on the student's own training views (what `kt-student train` logs) and on held-out test images are
both reported: a student can agree with its teacher on the views it was fitted to and not elsewhere.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_command(module: str, args: list[str]) -> tuple[float, float]:
    """One kt command in this process; (CPU s, wall s)."""
    import importlib

    print("+", module, " ".join(shlex.quote(a) for a in args), flush=True)
    c0, w0 = cpu_seconds(), time.perf_counter()
    code = importlib.import_module(module).main(args)
    gc.collect()
    if code != 0:
        raise SystemExit(f"step failed (exit {code}): {module} {' '.join(args)}")
    return cpu_seconds() - c0, time.perf_counter() - w0


def predictions(checkpoint: str, test: str, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, label) of every test image sorted by key, eval view at the model's own size."""
    from kt.checkpoints import load_model
    from kt.shards import expand_shards
    from kt.student.evaluate import predict

    model = load_model(checkpoint, what="--checkpoint").eval()
    return predict(model, expand_shards(test), workers=workers)[:2]


def teacher_predictions(out: Path, teacher: str, test: str):
    """The teacher's (pred, label) on the test set, computed once per teacher and test set (one file shared by
    every teacher scored later teachers' students against the first)."""
    digest = hashlib.sha256(f"{Path(teacher).resolve()}|{test}".encode()).hexdigest()[:10]
    path = out / f"teacher_test_{digest}.npz"
    if not path.exists():
        pred, label = predictions(teacher, test)
        np.savez(path, pred=pred, label=label)
    return np.load(path)


def scores(run_dir: Path, test: str, teacher) -> dict:
    """A distilled student's test top-1 and agreement with its teacher, and the teacher's top-1."""
    pred, label = predictions(str(run_dir), test)
    assert (label == teacher["label"]).all()
    return {"test_top1": float((pred == label).mean()), "test_agree": float((pred == teacher["pred"]).mean()),
            "teacher_top1": float((teacher["pred"] == teacher["label"]).mean())}


def build(args, cache_flags: str) -> tuple[Path, dict]:
    digest = hashlib.sha256(f"{args.teacher}|{args.transfer}|{cache_flags}".encode()).hexdigest()[:10]
    store = Path(args.out) / "cache" / f"{digest}.zarr"
    record = store.with_suffix(".json")
    if record.exists():
        return store, json.loads(record.read_text())
    cpu, wall = run_command("kt.teacher_cache.cli", ["build", "--teacher", args.teacher, "--data", args.transfer,
                                                     "--out", str(store), *shlex.split(cache_flags)])
    from kt.teacher_cache.reader import CacheReader

    reader = CacheReader(str(store))
    info = {"flags": cache_flags, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
            "views": int(reader.view_set.views), "view_spec": reader.view_set.spec.to_dict()}
    record.write_text(json.dumps(info))
    return store, info


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.exists() else set()
    if args.name in done:
        print(f"{args.name}: done")
        return
    teacher = teacher_predictions(out, args.teacher, args.test)
    store, cache = build(args, args.cache)
    run_dir = out / "runs" / args.name
    cpu, wall = run_command("kt.student.cli", ["train", "--cache", str(store), "--data", args.transfer,
                                               "--objective", "task", *shlex.split(args.train), "--out", str(run_dir)])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "agree" in m]
    config = json.loads((run_dir / "run.json").read_text()).get("config", {}) if (run_dir / "run.json").exists() else {}
    record = {
        "name": args.name, "teacher": str(args.teacher), "cache": args.cache, "train": args.train,
        "samples": int(steps[-1]["step"]) * int(config.get("batch_size", 64)) if steps else None,
        "steps": int(steps[-1]["step"]) if steps else None,
        "train_agree_last": steps[-1]["agree"] if steps else None,
        **scores(run_dir, args.test, teacher),
        "train_cpu_s": round(cpu, 1), "train_wall_s": round(wall, 1),
        "build_cpu_s": cache["cpu_s"], "cached_views": cache["views"],
        "load_after": round(__import__("os").getloadavg()[0], 2),
    }
    with results.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def rescore(args) -> None:
    """Recompute a recorded run's teacher top-1 and test agreement against the teacher given (records written
    while `run` shared one teacher file between teachers)."""
    out = Path(args.out)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    teacher = teacher_predictions(out, args.teacher, args.test)
    for r in rows:
        if r["name"] == args.name:
            r.update(teacher=str(args.teacher), **scores(out / "runs" / args.name, args.test, teacher))
            print(json.dumps(r))
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))


def labeled_union(out: Path, data: str, budget: int, seeds: list[int]) -> str:
    """OUT/labeled-B: the union of each seed's `budget`-per-class subset of `data`, so that a finetune takes exactly
    the images it would take from all of `data` without scanning it every run (as tools/demo_paper.py does)."""
    folder = out / f"labeled-{budget}"
    if (folder / "done").exists():
        return str(folder)
    from kt.shards import BadSamples, expand_shards, labeled_subset, load_classes, write_shards

    urls = expand_shards(data)
    classes = load_classes(urls)
    union = {}
    for seed in seeds:
        for s in labeled_subset(urls, budget, seed, BadSamples(0.01), num_classes=len(classes)):
            union[s.key] = s
    write_shards(sorted(union.values(), key=lambda s: s.key), folder, prefix="labeled", maxcount=5000, classes=classes)
    (folder / "done").write_text(json.dumps({"images": len(union), "seeds": seeds}))
    return str(folder)


def finetune(args) -> None:
    """Finetune a distilled student (`--init`) with one recipe on `--budget` labels per class, once per seed."""
    out = Path(args.out)
    results = out / "finetunes.jsonl"
    done = {json.loads(line)["name"] for line in results.read_text().splitlines()} if results.exists() else set()
    data = labeled_union(out, args.labeled, args.budget, args.seeds)
    init = Path(args.init)
    as_distilled = None
    if (out / "results.jsonl").exists():  # measured by `run` on the same test set
        for line in (out / "results.jsonl").read_text().splitlines():
            if json.loads(line)["name"] == init.name:
                as_distilled = json.loads(line)["test_top1"]
    for seed in args.seeds:
        name = f"{init.name}/{args.name}/b{args.budget}/s{seed}"
        if name in done:
            continue
        run_dir = out / "finetunes" / init.name / args.name / f"b{args.budget}-s{seed}"
        cpu, wall = run_command("kt.student.cli", [
            "finetune", "--init", str(init), "--data", data, "--val-data", args.test, "--labels-per-class",
            str(args.budget), "--subset-seed", str(seed), "--seed", str(seed), *shlex.split(args.args),
            "--out", str(run_dir)])
        top1 = json.loads((run_dir / "eval.json").read_text())["top1"]
        record = {"name": name, "init": str(init), "recipe": args.name, "args": args.args, "budget": args.budget,
                  "seed": seed, "top1": top1, "as_distilled": as_distilled, "cpu_s": round(cpu, 1)}
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))


def costs(args) -> None:
    """What bounds a distillation step on this machine: the student's forward + backward + AdamW step on a batch
    already in memory (torch's threads), against the replay (read, decode, render at the student's size, decode the
    targets: what one DataLoader worker does, on one thread), per student size and batch size. Run it quiet."""
    import os

    import torch

    from kt.checkpoints import load_model
    from kt.device import set_channels_last
    from kt.shards import expand_shards
    from kt.student.dataset import CacheSource
    from kt.student.distill import Distiller
    from kt.student.losses import create_objective
    from kt.student.stream import ReplayStream, StreamSpec
    from kt.teacher_cache.reader import CacheReader

    reader = CacheReader(args.cache)
    urls = expand_shards(args.transfer)[:2]
    sizes = tuple(len(reader.shard(u, []).keys) for u in urls)
    rows = []
    load0 = os.getloadavg()[0]
    for image_size in args.sizes:
        for batch_size in args.batches:
            spec = StreamSpec(tuple(urls), sizes, batch_size, seed=0, workers=0)
            torch.manual_seed(0)
            student = load_model(args.model, num_classes=10, image_size=image_size)
            objective = create_objective("task", {"num_classes": 10}, {"num_classes": 10})
            model = set_channels_last(Distiller(student, objective).train(), True)
            stream = ReplayStream(spec, 0, 0, CacheSource(reader, ["logits"]), reader.view_set, "cycle", image_size,
                                  student.mean, student.std)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # one worker's core
            it = iter(stream)
            next(it)
            t0 = time.process_time()
            batches = [next(it) for _ in range(args.steps)]
            replay = (time.process_time() - t0) / args.steps
            torch.set_num_threads(threads)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for b in batches[:3]:  # warm-up
                loss, _ = model(b)
                loss.backward()
                opt.step()
                opt.zero_grad()
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                loss, _ = model(b)
                loss.backward()
                opt.step()
                opt.zero_grad()
            step_wall, step_cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
            rows.append({"image_size": image_size, "batch_size": batch_size, "threads": threads,
                         "replay_cpu_ms_per_batch": round(1000 * replay, 1),
                         "student_step_wall_ms": round(1000 * step_wall, 1),
                         "student_step_cpu_ms": round(1000 * step_cpu, 1),
                         "replay_over_step": round(replay / step_wall, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}))


def report(args) -> None:
    """Markdown tables of every distillation and finetune measured in OUT, and OUT/convergence.png: test top-1 and
    agreement with the teacher of each distillation against the CPU time it took (build included)."""
    out = Path(args.out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    print("| run | samples | agreement, train views | agreement, test | test top-1 (%) | CPU s: build + distil |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['samples']:,} | {r['train_agree_last']:.3f} | {r['test_agree']:.3f} | "
              f"{100 * r['test_top1']:.2f} | {r['build_cpu_s']:.0f} + {r['train_cpu_s']:.0f} |")
    if (out / "finetunes.jsonl").exists():
        fts = [json.loads(line) for line in (out / "finetunes.jsonl").read_text().splitlines()]
        groups: dict[tuple, list] = {}
        for f in fts:
            groups.setdefault((Path(f["init"]).name, f["recipe"], f["budget"], f["as_distilled"]), []).append(f["top1"])
        print("\n| distilled student | as distilled (%) | finetune recipe | labels/class | finetuned (%), mean ± std | seeds |")
        print("|---|---|---|---|---|---|")
        for (init, recipe, budget, base), tops in groups.items():
            t = np.array(tops) * 100
            std = t.std(ddof=1) if len(t) > 1 else 0.0
            shown = "-" if base is None else f"{100 * base:.2f}"  # a run not measured by `run` (no test top-1)
            print(f"| {init} | {shown} | {recipe} | {budget} | {t.mean():.2f} ± {std:.2f} | {len(t)} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        cpu = r["build_cpu_s"] + r["train_cpu_s"]
        axes[0].scatter(cpu, 100 * r["test_top1"])
        axes[0].annotate(r["name"], (cpu, 100 * r["test_top1"]), fontsize=7)
        axes[1].scatter(r["samples"], r["test_agree"])
        axes[1].annotate(r["name"], (r["samples"], r["test_agree"]), fontsize=7)
    if rows:
        axes[0].axhline(100 * rows[0]["teacher_top1"], color="black", ls="--", lw=1, label="teacher")
        axes[0].legend()
    axes[0].set(xlabel="CPU seconds (cache build + distillation)", ylabel="test top-1 as distilled (%)")
    axes[1].set(xlabel="samples seen", ylabel="agreement with the teacher on test images")
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)


def strength(args) -> None:
    """The teacher-strength figure: each named distillation's student (as distilled, and finetuned with `--recipe`
    on `--budget` labels/class, mean ± std over seeds) against its teacher's test top-1, the student = teacher
    diagonal, and the rows that do not depend on the teacher as horizontal lines (`--line LABEL=MEAN`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    runs = {r["name"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    fts = [json.loads(line) for line in (out / "finetunes.jsonl").read_text().splitlines()]
    points = []
    for name in args.runs:
        r = runs[name]
        tops = [f["top1"] for f in fts if Path(f["init"]).name == name and f["recipe"] == args.recipe
                and f["budget"] == args.budget]
        points.append((100 * r["teacher_top1"], 100 * r["test_top1"], 100 * np.mean(tops) if tops else np.nan,
                       100 * np.std(tops, ddof=1) if len(tops) > 1 else 0.0))
        print(json.dumps({"run": name, "teacher": points[-1][0], "as_distilled": points[-1][1],
                          "finetuned": points[-1][2], "std": points[-1][3], "seeds": len(tops)}))
    points.sort()
    t, d, f, e = (np.array(x) for x in zip(*points))
    fig, ax = plt.subplots(figsize=(7, 5))
    lo, hi = min(t.min(), d.min()) - 8, max(t.max(), d.max()) + 3
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls=":", label="student = teacher")
    ax.plot(t, d, "o-", color="tab:green", label="task-oriented student, as distilled")
    ax.errorbar(t, f, yerr=e, fmt="s-", color="tab:blue", capsize=3,
                label=f"the same, finetuned ({args.recipe}, {args.budget} labels/class)")
    colors = ["tab:red", "tab:orange", "tab:purple", "tab:brown"]
    for (label, value), color in zip((x.split("=", 1) for x in args.line), colors):
        ax.axhline(float(value), color=color, ls="--", lw=1, label=label)
    ax.set(xlabel="teacher test top-1 (%)", ylabel="student test top-1 (%)", xlim=(lo, hi),
           title="Student against teacher strength (Fashion-MNIST, Lite0 at 32 px)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(args.png, dpi=110, bbox_inches="tight")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--teacher", required=True)
    r.add_argument("--transfer", required=True)
    r.add_argument("--test", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--cache", default="", help="kt-cache build flags")
    r.add_argument("--train", default="", help="kt-student train flags")
    f = sub.add_parser("finetune")
    f.add_argument("--out", required=True)
    f.add_argument("--init", required=True, help="a kt-student train run")
    f.add_argument("--labeled", default="data/fashion-mnist/train", help="labeled pool (subsets drawn per seed)")
    f.add_argument("--test", default="data/fashion-mnist/test")
    f.add_argument("--budget", type=int, default=10)
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    f.add_argument("--name", required=True)
    f.add_argument("--args", default="", help="kt-student finetune flags of the recipe")
    c = sub.add_parser("costs")
    c.add_argument("--cache", required=True)
    c.add_argument("--transfer", required=True)
    c.add_argument("--model", default="tf_efficientnet_lite0")
    c.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64])
    c.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    c.add_argument("--steps", type=int, default=20)
    q = sub.add_parser("report")
    q.add_argument("--out", required=True)
    x = sub.add_parser("rescore")
    x.add_argument("--out", required=True)
    x.add_argument("--name", required=True)
    x.add_argument("--teacher", required=True)
    x.add_argument("--test", default="data/fashion-mnist/test")
    t = sub.add_parser("strength")
    t.add_argument("--out", required=True)
    t.add_argument("--runs", nargs="+", required=True, help="distillations, one per teacher")
    t.add_argument("--recipe", default="head_lr2e-3", help="the finetune recipe plotted")
    t.add_argument("--budget", type=int, default=10)
    t.add_argument("--line", action="append", default=[], help="LABEL=MEAN, a row that does not depend on the teacher")
    t.add_argument("--png", required=True)
    args = p.parse_args(argv)
    {"run": run, "finetune": finetune, "costs": costs, "report": report, "strength": strength,
     "rescore": rescore}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
