"""A recipe as stages: each stage one `kt-*` command (or a `prepare` command line), its flags, the folder it
writes under the recipe's `out`, and the stages whose outputs it reads; and the report's rows, each the runs
whose `eval.json` it averages.

The grid, per budget: the teacher finetuned on the labels (per teacher seed; or one teacher on `teacher.pool`
for every budget) and its variants at the first budget; per student, labels only, and per objective and transfer
set a distillation (`task`: from the budget's teacher through a task cache; the others: from the pretrained
teacher through one feature cache per transfer set, shared by every budget and student) then one finetune per
seed from it; the IM-Pretrain baselines; the curve points and as-distilled evaluations a student asks for.
Curated transfer sets add the embeddings of the gallery and the queries and one curate each.

Each stage's flags are the fields the recipe declares (its own and a command block's) and nothing else: the
command's defaults hold for the rest, so a changed default reaches every recipe. Its config is built here with
the command's own dataclass and range checks, so a bad value fails before anything runs, named by the recipe
field that set it; the same dataclass gives the stage's identity (the resolved config without the fields a run
may change when it resumes), which the runner compares with the identity a stage ran with. Two stages that
would run the same command are one (a teacher variant that is the teacher, the curve point that is the rows'
distillation).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt.config import check_config, config_dict, yaml_value
from kt.errors import UserError
from kt.recipe.schema import Recipe, Student, load_recipe, transfer_sets
from kt.student.loop import RESUMABLE_CHANGES  # the run-folder policy's own list


@dataclass(frozen=True)
class Command:
    """A stage kind: the command it runs and which of its fields the recipe owns."""

    script: str  # the console script, as the plan prints it
    module: str  # python -m MODULE (in-process: MODULE.main)
    words: tuple[str, ...]  # the subcommand
    config: str  # "module:Class", the command's config dataclass
    owned: frozenset[str]  # fields the recipe sets itself: refused in a command block
    resumable: frozenset[str]  # fields a run may change when it resumes: not part of a stage's identity
    skip: frozenset[str] = frozenset()  # config fields the command has no flag for

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


COMMANDS = {
    "finetune": Command("kt-student", "kt.student.cli", ("finetune",), "kt.student.finetune:FinetuneConfig",
                        frozenset({"task", "model", "pretrained", "init", "data", "val_data", "labels_per_class",
                                   "labeled_images", "subset_seed", "seed", "image_size", "out"}),
                        frozenset(RESUMABLE_CHANGES)),
    "distill": Command("kt-student", "kt.student.cli", ("train",), "kt.student.distill:DistillConfig",
                       frozenset({"task", "model", "pretrained", "cache", "teacher", "data", "objective",
                                  "image_size", "out"}),
                       frozenset(RESUMABLE_CHANGES - {"workers"})),  # the worker count orders a distillation's batches
    "cache": Command("kt-cache", "kt.teacher_cache.cli", ("build",), "kt.teacher_cache.build:BuildConfig",
                     frozenset({"teacher", "pretrained", "data", "out", "targets", "image_size", "output_stride"}),
                     # how the build runs, not what it stores (a build resumes under any of them)
                     frozenset({"out", "batch_size", "workers", "render", "writer_threads", "device_encode",
                                "teacher_graph", "max_bad_fraction", "overwrite"})),
    "eval": Command("kt-student", "kt.student.cli", ("eval",), "kt.student.evaluate:EvalConfig",
                    frozenset({"checkpoint", "data", "runs", "out"}),
                    frozenset({"out", "batch_size", "workers", "device"})),
    "embed": Command("kt-retrieve", "kt.retrieval.cli", ("embed",), "kt.retrieval.embed:EmbedConfig",
                     frozenset({"encoder", "pretrained", "data", "out", "resume"}),
                     frozenset({"out", "batch_size", "device", "resume"})),
    "curate": Command("kt-retrieve", "kt.retrieval.cli", ("curate",), "kt.retrieval.curate:CurateJob",
                      frozenset({"queries", "gallery", "out"}), frozenset({"out", "block_size", "device"}),
                      skip=frozenset({"ivfpq"})),
}
TASK_TARGET = {"classification": "logits", "segmentation": "seg_logits"}
FEATURE_TARGET = {"embedding-contrastive": "embedding", "patch-cosine": "patches"}
GROUP = {"task": "task-oriented", "embedding-contrastive": "task-agnostic", "patch-cosine": "task-agnostic"}
METRICS_FILE = "eval.json"


@dataclass
class Stage:
    name: str  # its path under the recipe's out, and its name in progress lines
    kind: str  # prepare or a COMMANDS key
    out: Path  # what it writes: a run folder, a store, a file, the prepared path
    values: dict  # the command fields the recipe sets, typed
    origin: dict  # field -> the recipe field that set it
    needs: list[str]  # stages whose outputs it reads
    identity: dict  # what it computes: the resolved config without resumable fields (prepare: its command line)
    command_line: str = ""  # prepare: the command as written

    @property
    def command(self) -> Command | None:
        return COMMANDS.get(self.kind)

    def argv(self) -> list[str]:
        """The command's words after `python -m MODULE` (prepare: the command line's words)."""
        if self.kind == "prepare":
            return shlex.split(self.command_line)
        return [*self.command.words, *flags(self.values, self.command)]

    def shell(self) -> str:
        """The single command this stage amounts to, as a user would type it."""
        if self.kind == "prepare":
            return self.command_line
        return " ".join(shlex.quote(w) for w in [self.command.script, *self.argv()])

    @property
    def metrics(self) -> Path | None:
        """The eval.json a row reads (finetunes and evaluations)."""
        return {"finetune": self.out / METRICS_FILE, "eval": self.out}.get(self.kind)

    @property
    def marker(self) -> Path:
        """What exists once the stage has finished (with the runner's record of it, for caches and stores)."""
        return {"finetune": self.out / (METRICS_FILE if self.values.get("val_data") else "checkpoint/card.json"),
                "distill": self.out / "checkpoint" / "card.json", "curate": self.out / "manifest.csv"
                }.get(self.kind, self.out)


@dataclass
class Row:
    table: str
    label: str
    group: str  # labels | im-pretrain | task-agnostic | task-oriented | teacher
    budget: int
    runs: list[str]  # stages whose eval.json the row averages
    curve: dict | None = None  # curve rows: transfer (shard spec), views, epochs


@dataclass
class Plan:
    recipe: Recipe
    path: Path
    stages: dict[str, Stage]
    rows: list[Row]

    @property
    def out(self) -> Path:
        return Path(self.recipe.out)

    def needed(self, names: list[str]) -> list[str]:
        """`names` and every stage they need, in plan order."""
        want, todo = set(), list(names)
        while todo:
            name = todo.pop()
            if name not in want:
                want.add(name)
                todo.extend(self.stages[name].needs)
        return [n for n in self.stages if n in want]


def flags(values: dict, command: Command) -> list[str]:
    """Command-line words for `values`, as the command's parser reads them back (kt.config.add_config_args)."""
    words = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if name == "codec":  # kt-cache build --codec TARGET=SPEC, once per target
            words += [w for spec in value for w in ("--codec", spec)]
        elif isinstance(value, bool):
            words.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is None:
            words += [flag, "none"]
        elif isinstance(value, list):
            words += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, dict):
            words += [flag, json.dumps(value)]
        else:
            words += [flag, repr(value) if isinstance(value, float) else str(value)]
    return words


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def load_plan(path: str | Path) -> Plan:
    """The plan of the recipe file `path`; a `UserError` names the file and the field at fault."""
    recipe = load_recipe(path)
    try:
        return Planner(recipe, Path(path)).create()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


class Planner:
    def __init__(self, recipe: Recipe, path: Path):
        self.r, self.path = recipe, path
        self.out = Path(recipe.out)
        self.stages: dict[str, Stage] = {}
        self.same: dict[str, str] = {}  # kind + identity -> the stage that runs it
        self.rows: list[Row] = []
        self.transfer = transfer_sets(recipe.data)
        self.seg = recipe.task == "segmentation"

    # -- stages ----------------------------------------------------------------------------------
    def add(self, kind: str, name: str, values: dict, origin: dict, needs: list[str]) -> str:
        """A stage running `kind` with `values` (typed command fields) into `OUT/name`; returns its name, or the
        name of the stage that already runs the same command."""
        command = COMMANDS[kind]
        out = self.out / name
        out = {"cache": out.with_name(out.name + ".zarr"), "embed": out.with_name(out.name + ".emb"),
               "eval": out / METRICS_FILE}.get(kind, out)
        values = {**values, "out": str(out)}
        cls = command.config_class()
        cfg = cls(**values)
        check_config(cfg, lambda field: f"{origin.get(field, name + ': ' + field)}")
        for f in dataclasses.fields(cfg):  # what the command cannot run without (curate's size)
            if f.metadata.get("required") and getattr(cfg, f.name) in (None, "", [], {}):
                raise UserError(f"stage {name}: {command.script} {' '.join(command.words)} needs {f.name}; set it in "
                                f"the stage's {kind} block")
        resolved = config_dict(cfg)
        identity = {k: v for k, v in resolved.items() if k not in command.resumable and k != "out"}
        key = kind + json.dumps(identity, sort_keys=True)
        if key in self.same:
            return self.same[key]
        if name in self.stages:
            raise AssertionError(f"two stages named {name}")  # a bug: the planner names stages uniquely
        self.same[key] = name
        self.stages[name] = Stage(name, kind, out, values, origin, sorted(set(needs)), identity)
        return name

    def settings(self, kind: str, blocks: list[tuple[dict, str]], budget: int | None = None) -> tuple[dict, dict]:
        """(values, origin) of command blocks merged in order; a block's `by_budget` entry for `budget` overrides
        that block's own values."""
        command = COMMANDS[kind]
        cls = command.config_class()
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in command.skip]
        values, origin = {}, {}
        for block, where in blocks:
            layers = [({k: v for k, v in block.items() if k != "by_budget"}, where)]
            if "by_budget" in block:
                layers.append(self.by_budget(kind, block["by_budget"], budget, f"{where}.by_budget"))
            for layer, at in layers:
                for k, v in layer.items():
                    if k in command.owned:
                        raise UserError(f"{at}.{k}: set by the recipe itself, not in a {kind} block")
                    if k not in names:
                        raise UserError(f"{at}.{k}: not a field of {command.script} {' '.join(command.words)} "
                                        f"(valid: {', '.join(n for n in names if n not in command.owned)})")
                    values[k] = self.codec(v, f"{at}.{k}") if k == "codec" else yaml_value(hints[k], v, f"{at}.{k}")
                    origin[k] = f"{at}.{k}"
        return values, origin

    def by_budget(self, kind: str, table: Any, budget: int | None, where: str) -> tuple[dict, str]:
        if kind != "finetune":
            raise UserError(f"{where}: by_budget is for finetune blocks")
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise UserError(f"{where}: expected a mapping of budget: {{field: value}}")
        bad = [b for b in table if b not in self.r.budgets]
        if bad:
            raise UserError(f"{where}: {bad[0]!r} is not one of the budgets {self.r.budgets}")
        return table.get(budget, {}), f"{where}.{budget}"

    @staticmethod
    def codec(value: Any, where: str) -> list[str]:
        """A cache block's codec: TARGET=SPEC strings, or a mapping of target: spec."""
        if isinstance(value, dict):
            return [f"{t}={spec}" for t, spec in value.items()]
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise UserError(f"{where}: expected TARGET=SPEC strings or a mapping of target: spec, got {value!r}")

    def prepare(self, i: int) -> str:
        p = self.r.prepare[i]
        try:
            argv = shlex.split(p.command)
        except ValueError as e:
            raise UserError(f"prepare[{i}].command: {e}") from None
        if not argv:
            raise UserError(f"prepare[{i}].command is empty")
        name = p.creates
        if name in self.stages:
            raise UserError(f"prepare[{i}].creates: {name} is made by an earlier prepare step")
        self.stages[name] = Stage(name, "prepare", Path(p.creates), {}, {"command": f"prepare[{i}].command"}, [],
                                  {"command": p.command}, command_line=p.command)
        return name

    def finetune(self, name: str, model: tuple[str, str], budget: int, seed: tuple[int, str], image_size: tuple[int, str],
                 blocks: list[tuple[dict, str]], pretrained: tuple[str, str] = ("", ""), init: str = "",
                 pool: bool = False) -> str:
        """One finetune on `budget`'s labeled subset of `seed` (`pool`: on the teacher's pool instead); each
        (value, recipe field) pair keeps its origin."""
        r = self.r
        values, origin = {"model": model[0]}, {"model": model[1]}
        if pretrained[0]:
            values["pretrained"], origin["pretrained"] = pretrained
        if init:
            values["init"], origin["init"] = str(self.stages[init].out), f"the stage {init}"
        if self.seg:
            values["task"], origin["task"] = "segmentation", "task"
        budget_flag = "labeled_images" if self.seg else "labels_per_class"
        data, size = (r.teacher.pool, r.teacher.pool_size or None) if pool else (r.data.labeled, budget)
        values.update({"data": data, "val_data": r.data.test, budget_flag: size, "subset_seed": seed[0],
                       "seed": seed[0], "image_size": image_size[0]})
        origin.update({"data": "teacher.pool" if pool else "data.labeled", "val_data": "data.test",
                       budget_flag: "teacher.pool_size" if pool else "budgets",
                       "subset_seed": seed[1], "seed": seed[1], "image_size": image_size[1]})
        more, more_origin = self.settings("finetune", blocks, budget)
        needs = self.data_needs(data) + self.data_needs(r.data.test) + ([init] if init else [])
        return self.add("finetune", name, {**values, **more}, {**origin, **more_origin}, needs)

    # -- data ------------------------------------------------------------------------------------
    def shards(self, transfer: str) -> tuple[str, list[str]]:
        """(shard spec, stages that make it) of a transfer set."""
        t = self.transfer[transfer]
        if t.curate:
            return str(self.stages[self.curated[transfer]].out / "shards"), [self.curated[transfer]]
        return t.shards, self.data_needs(t.shards)

    def data_needs(self, spec: str) -> list[str]:
        """The prepare steps whose path holds a part of `spec`."""
        return [n for n, s in self.stages.items() if s.kind == "prepare" and any(
            _under(part, s.out) for part in spec.split("::"))]

    def check_data(self) -> None:
        """Every local shard spec exists or is made by a prepare step; labeled and test data name the same classes."""
        from kt.shards import expand_shards, is_url, load_classes

        r = self.r
        specs = [("data.labeled", r.data.labeled), ("data.test", r.data.test)]
        specs += [(f"data.transfer.{n}", t.shards) for n, t in self.transfer.items() if t.shards]
        if r.teacher and r.teacher.pool:
            specs.append(("teacher.pool", r.teacher.pool))
        if r.retrieval:
            specs += [("retrieval.gallery", r.retrieval.gallery), ("retrieval.queries", r.retrieval.queries)]
        found = {}
        for where, spec in specs:
            if is_url(spec) or self.data_needs(spec):
                continue
            try:
                found[where] = expand_shards(spec)
            except UserError as e:
                raise UserError(f"{where}: {e} (and no prepare step makes it)") from None
        if "data.labeled" in found and "data.test" in found:
            labeled, test = load_classes(found["data.labeled"]), load_classes(found["data.test"])
            if labeled and test and labeled != test:
                i = next((i for i, (a, b) in enumerate(zip(labeled, test)) if a != b), min(len(labeled), len(test)))
                raise UserError(f"data.test names other classes than data.labeled ({len(test)} vs {len(labeled)}; "
                                f"first difference at index {i}): the test set must be labeled with the same classes")

    def check_sizes(self) -> None:
        """Segmentation: every model's input size is a multiple of its output stride (the grid the cached
        per-pixel targets and the student's logits are resized between)."""
        if not self.seg:
            return
        from kt.segmentation import check_output_stride

        r = self.r
        checks = []
        if r.teacher:
            stride = self.settings("finetune", [(r.teacher.finetune, "teacher.finetune")], r.budgets[0])[0]
            checks.append(("teacher.image_size", r.teacher.image_size, stride.get("output_stride") or 8))
        for i, st in enumerate(r.students):
            stride = self.settings("distill", [(r.distill, "distill"), (st.distill, f"students[{i}].distill")])[0]
            checks.append((f"students[{i}].image_size", st.image_size, stride.get("output_stride") or 8))
        for j, im in enumerate(r.baselines.im_pretrain):
            stride = self.settings("finetune", [(r.finetune, "finetune"), (im.finetune, f"baselines.im_pretrain[{j}]"
                                                                                         ".finetune")], r.budgets[0])[0]
            checks.append((f"baselines.im_pretrain[{j}].image_size", im.image_size, stride.get("output_stride") or 8))
        for where, size, stride in checks:
            try:
                check_output_stride(stride, size)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None

    def check_students(self) -> None:
        from kt.student.losses import objective_class

        r = self.r
        rows_sets = [n for n, t in self.transfer.items() if t.rows]
        for i, st in enumerate(r.students):
            at = f"students[{i}]"
            for objective in st.objectives:
                try:
                    objective_class(objective, r.task)
                except UserError as e:
                    raise UserError(f"{at}.objectives: {e}") from None
            if st.objectives and r.teacher is None:
                raise UserError(f"{at}.objectives: a distillation reads a teacher's cache, and the recipe has no "
                                "teacher")
            if st.objectives and not rows_sets:
                raise UserError(f"{at}.objectives: a distillation needs a transfer set, and data.transfer has none "
                                "for the rows")
            for objective in st.evaluate_distilled:
                if objective not in st.objectives:
                    raise UserError(f"{at}.evaluate_distilled: no stage distills {objective} (not in its objectives)")
                if objective != "task":
                    raise UserError(f"{at}.evaluate_distilled: a {objective} student has no trained task head; only "
                                    "the task objective's can be evaluated as distilled")
            for j, v in enumerate(st.variants):
                if v.objective not in st.objectives:
                    raise UserError(f"{at}.variants[{j}].objective: no stage distills {v.objective} (not in its "
                                    "objectives)")
                bad = [b for b in v.budgets if b not in r.budgets]
                if bad:
                    raise UserError(f"{at}.variants[{j}].budgets: {bad[0]} is not one of the budgets {r.budgets}")
            if st.curve:
                if "task" not in st.objectives:
                    raise UserError(f"{at}.curve: the curve distills the task objective, not in its objectives")
                if st.curve.budget and st.curve.budget not in r.budgets:
                    raise UserError(f"{at}.curve.budget: {st.curve.budget} is not one of the budgets {r.budgets}")
                for j, p in enumerate(st.curve.points):
                    for key in ("transfer", "cache"):
                        name = getattr(p, key)
                        if name and name not in self.transfer:
                            raise UserError(f"{at}.curve.points[{j}].{key}: no transfer set named {name!r} (data.transfer "
                                            f"has {', '.join(self.transfer) or 'none'})")
        for name, t in self.transfer.items():
            if t.curate and r.retrieval is None:
                raise UserError(f"data.transfer.{name}: a curated set needs the retrieval section (gallery, queries, "
                                "encoder)")

    # -- the grid --------------------------------------------------------------------------------
    def create(self) -> Plan:
        r = self.r
        self.check_students()
        self.check_sizes()
        for i in range(len(r.prepare)):
            self.prepare(i)
        self.check_data()
        self.curated = self.retrieval()
        self.rows_sets = [n for n, t in self.transfer.items() if t.rows]
        needs_teacher = any(st.objectives for st in r.students) or r.report.teacher_row
        for k, budget in enumerate(r.budgets):
            teachers = [self.teacher(budget, s) for s in r.teacher.seeds] if r.teacher and needs_teacher else []
            if k == 0 and r.teacher:
                for j, v in enumerate(r.teacher.variants):
                    name = f"teacher/{slug(v.label)}-{self.teacher_data(budget)}-s{r.teacher.seeds[0]}"
                    run = self.finetune(name, (r.teacher.model, "teacher.model"), budget,
                                        (r.teacher.seeds[0], "teacher.seeds"),
                                        (v.image_size or r.teacher.image_size,
                                         f"teacher.variants[{j}].image_size" if v.image_size else "teacher.image_size"),
                                        [(r.teacher.finetune, "teacher.finetune"),
                                         (v.finetune, f"teacher.variants[{j}].finetune")],
                                        (r.teacher.pretrained, "teacher.pretrained"), pool=bool(r.teacher.pool))
                    self.rows.append(Row("teacher variants", v.label, "teacher", budget, [run]))
            tables = [f"student {st.model}" for st in r.students] or ["baselines"]
            for i, st in enumerate(r.students):
                self.student_rows(i, st, budget, teachers, tables)
                self.teacher_row(tables[i], budget, teachers)
            if not r.students:
                self.im_rows(budget, tables[0], tables)
                self.teacher_row(tables[0], budget, teachers)
        return Plan(r, self.path, self.stages, self.rows)

    def teacher_data(self, budget: int) -> str:
        """The part of a teacher's stage name that says what it finetuned on."""
        t = self.r.teacher
        return f"pool{t.pool_size or ''}" if t.pool else f"n{budget}"

    def teacher(self, budget: int, seed: int) -> str:
        t = self.r.teacher
        return self.finetune(f"teacher/{self.teacher_data(budget)}-s{seed}", (t.model, "teacher.model"), budget,
                             (seed, "teacher.seeds"), (t.image_size, "teacher.image_size"),
                             [(t.finetune, "teacher.finetune")], (t.pretrained, "teacher.pretrained"),
                             pool=bool(t.pool))

    def teacher_row(self, table: str, budget: int, teachers: list[str]) -> None:
        if teachers and self.r.report.teacher_row:
            on = " on its pool" if self.r.teacher.pool else ""
            self.rows.append(Row(table, f"teacher ({self.r.teacher.model}, finetuned{on})", "teacher", budget,
                                 teachers))

    def im_rows(self, budget: int, table: str, tables: list[str]) -> None:
        r = self.r
        for j, im in enumerate(r.baselines.im_pretrain):
            own = f"student {im.model}"
            if own in tables and own != table:  # its own student's table only; else a reference row of every table
                continue
            runs = [self.finetune(f"runs/im-pretrain-{slug(im.model)}-n{budget}-s{s}",
                                  (im.model, f"baselines.im_pretrain[{j}].model"), budget, (s, "seeds"),
                                  (im.image_size, f"baselines.im_pretrain[{j}].image_size"),
                                  [(r.finetune, "finetune"), (im.finetune, f"baselines.im_pretrain[{j}].finetune")],
                                  (im.pretrained, f"baselines.im_pretrain[{j}].pretrained")) for s in r.seeds]
            self.rows.append(Row(table, im.label or f"IM-Pretrain ({im.model})", "im-pretrain", budget, runs))

    def student_rows(self, i: int, st: Student, budget: int, teachers: list[str], tables: list[str]) -> None:
        r, at, table, name = self.r, f"students[{i}]", f"student {st.model}", slug(st.model)
        blocks = [(r.finetune, "finetune"), (st.finetune, f"{at}.finetune")]

        def finetunes(run: str, init: str, more: list[tuple[dict, str]] = ()) -> list[str]:
            return [self.finetune(f"runs/{run}-n{budget}-s{s}", (st.model, f"{at}.model"), budget, (s, "seeds"),
                                  (st.image_size, f"{at}.image_size"), [*blocks, *more], init=init) for s in r.seeds]

        if r.baselines.labels:
            runs = [self.finetune(f"runs/{name}-labels-n{budget}-s{s}", (st.model, f"{at}.model"), budget, (s, "seeds"),
                                  (st.image_size, f"{at}.image_size"),
                                  [*blocks, (r.baselines.labels_finetune, "baselines.labels_finetune")],
                                  (st.pretrained, f"{at}.pretrained")) for s in r.seeds]
            self.rows.append(Row(table, "labels only" + (f" (from {st.pretrained})" if st.pretrained else
                                                         " (random init)"), "labels", budget, runs))
        self.im_rows(budget, table, tables)
        several = len(self.rows_sets) > 1
        for objective in st.objectives:
            for t in self.rows_sets:
                label = ("task-oriented" if objective == "task" else f"task-agnostic ({objective})") + \
                    (f", {self.transfer[t].label or t}" if several else "")
                init = self.distillation(i, st, objective, t, budget, teachers)
                self.rows.append(Row(table, label, GROUP[objective], budget,
                                     finetunes(f"{name}-{objective}-{slug(t)}", init)))
                if objective in st.evaluate_distilled:
                    self.rows.append(Row(table, f"{label}, as distilled (no finetuning)", GROUP[objective], budget,
                                         [self.evaluation(init)]))
        for j, v in enumerate(st.variants):
            if v.budgets and budget not in v.budgets:
                continue
            for t in self.rows_sets:
                init = self.distillation(i, st, v.objective, t, budget, teachers)
                label = v.label + (f", {self.transfer[t].label or t}" if several else "")
                self.rows.append(Row(table, label, GROUP[v.objective], budget,
                                     finetunes(f"{name}-{v.objective}-{slug(t)}-{slug(v.label)}", init,
                                               [(v.finetune, f"{at}.variants[{j}].finetune")])))
        if st.curve and budget == (st.curve.budget or r.budgets[0]):
            self.curve(i, st, budget, teachers, finetunes)

    def curve(self, i: int, st: Student, budget: int, teachers: list[str], finetunes) -> None:
        at, table = f"students[{i}].curve", f"student {st.model}"
        for j, p in enumerate(st.curve.points):
            run = self.distillation(i, st, "task", p.transfer, budget, teachers,
                                    epochs=(p.epochs, f"{at}.points[{j}].epochs"), cache=p.cache or p.transfer)
            stage = self.stages[run]
            cache = next(self.stages[n] for n in stage.needs if self.stages[n].kind == "cache")
            shards = self.shards(p.transfer)[0]
            point = {"transfer": shards, "views": cache.identity["views"], "epochs": stage.identity["epochs"]}
            self.rows.append(Row("curve", self.transfer[p.transfer].label or p.transfer, "task-oriented", budget,
                                 [self.evaluation(run)], curve=point))
            if p.finetune:
                label = f"task-oriented, from the curve's {self.transfer[p.transfer].label or p.transfer} x " \
                        f"{point['epochs']} epochs distillation"
                self.rows.append(Row(table, label, "task-oriented", budget,
                                     finetunes(f"{slug(st.model)}-task-curve{j}", run)))

    def distillation(self, i: int, st: Student, objective: str, transfer: str, budget: int, teachers: list[str],
                     epochs: tuple[int, str] = (0, ""), cache: str = "") -> str:
        """The student distilled with `objective` over `transfer`: from the budget's teacher (task) or the
        pretrained teacher (features, one cache per transfer set for every budget)."""
        r, at = self.r, f"students[{i}]"
        cache = cache or transfer
        data, made = self.shards(transfer)
        if objective == "task":
            store = self.task_cache(budget, cache, teachers[0])
            name = f"distill/{slug(st.model)}-task-{self.teacher_data(budget)}-{slug(transfer)}"
        else:
            store = self.feature_cache(cache)
            name = f"distill/{slug(st.model)}-{objective}-{slug(transfer)}"
        if cache != transfer:
            name += f"-cache-{slug(cache)}"
        values = {"model": st.model, "cache": str(self.stages[store].out), "data": data, "objective": objective,
                  "image_size": st.image_size}
        origin = {"model": f"{at}.model", "cache": f"the stage {store}", "data": f"data.transfer.{transfer}",
                  "objective": f"{at}.objectives", "image_size": f"{at}.image_size"}
        if st.pretrained:
            values["pretrained"], origin["pretrained"] = st.pretrained, f"{at}.pretrained"
        if self.seg:
            values["task"], origin["task"] = "segmentation", "task"
        more, more_origin = self.settings("distill", [(r.distill, "distill"), (st.distill, f"{at}.distill")])
        values.update(more)
        origin.update(more_origin)
        if epochs[0]:
            values["epochs"], origin["epochs"] = epochs
            name += f"-e{epochs[0]}"
        return self.add("distill", name, values, origin, [store, *made])

    def task_cache(self, budget: int, transfer: str, teacher: str) -> str:
        data, made = self.shards(transfer)
        values = {"teacher": str(self.stages[teacher].out), "data": data, "targets": [TASK_TARGET[self.r.task]],
                  "image_size": self.r.teacher.image_size}
        origin = {"teacher": f"the stage {teacher}", "data": f"data.transfer.{transfer}", "targets": "task",
                  "image_size": "teacher.image_size"}
        more, more_origin = self.settings("cache", [(self.r.cache, "cache")])
        return self.add("cache", f"cache/task-{self.teacher_data(budget)}-{slug(transfer)}", {**values, **more},
                        {**origin, **more_origin}, [teacher, *made])

    def feature_cache(self, transfer: str) -> str:
        """The pretrained teacher's features over `transfer`: what every task-agnostic objective over it reads."""
        r, t = self.r, self.r.teacher
        wanted = {FEATURE_TARGET[o] for st in r.students for o in st.objectives if o in FEATURE_TARGET}
        data, made = self.shards(transfer)
        values, origin = {"teacher": t.model}, {"teacher": "teacher.model"}
        if t.pretrained:
            values["pretrained"], origin["pretrained"] = t.pretrained, "teacher.pretrained"
        values.update({"data": data, "targets": sorted(wanted), "image_size": t.image_size})
        origin.update({"data": f"data.transfer.{transfer}", "targets": "students[*].objectives",
                       "image_size": "teacher.image_size"})
        if self.seg:  # the pretrained backbone at the finetuned teacher's output stride: its grid is the target
            stride = self.settings("finetune", [(t.finetune, "teacher.finetune")], r.budgets[0])
            values["output_stride"] = stride[0].get("output_stride") or 8
            origin["output_stride"] = stride[1].get("output_stride", "task")
        more, more_origin = self.settings("cache", [(r.cache, "cache")])
        return self.add("cache", f"cache/features-{slug(transfer)}", {**values, **more}, {**origin, **more_origin}, made)

    def evaluation(self, run: str) -> str:
        """The distilled student of `run` evaluated as it is."""
        values = {"checkpoint": str(self.stages[run].out), "data": self.r.data.test}
        origin = {"checkpoint": f"the stage {run}", "data": "data.test"}
        more, more_origin = self.settings("eval", [(self.r.eval, "eval")])
        return self.add("eval", "eval/" + run.split("/", 1)[1], {**values, **more}, {**origin, **more_origin},
                        [run, *self.data_needs(self.r.data.test)])

    def retrieval(self) -> dict[str, str]:
        """transfer set -> the curate stage that makes it."""
        r, out = self.r, {}
        curated = {n: t for n, t in self.transfer.items() if t.curate}
        if not curated:
            return out
        q = r.retrieval
        stores = {}
        for which, spec in (("gallery", q.gallery), ("queries", q.queries)):
            values, origin = {"encoder": q.encoder}, {"encoder": "retrieval.encoder"}
            if q.pretrained:
                values["pretrained"], origin["pretrained"] = q.pretrained, "retrieval.pretrained"
            values.update({"data": spec, "resume": True})  # a rerun continues a killed store
            origin.update({"data": f"retrieval.{which}", "resume": "retrieval"})
            more, more_origin = self.settings("embed", [(q.embed, "retrieval.embed")])
            stores[which] = self.add("embed", f"retrieval/{which}", {**values, **more}, {**origin, **more_origin},
                                     self.data_needs(spec))
        for name, t in curated.items():
            values = {"queries": str(self.stages[stores["queries"]].out), "gallery": str(self.stages[stores["gallery"]].out)}
            origin = {"queries": "retrieval.queries", "gallery": "retrieval.gallery"}
            more, more_origin = self.settings("curate", [(t.curate, f"data.transfer.{name}.curate")])
            out[name] = self.add("curate", f"retrieval/{slug(name)}", {**values, **more}, {**origin, **more_origin},
                                 list(stores.values()))
        return out


def _under(spec_part: str, path: Path) -> bool:
    """Whether the shard spec part names files under `path` (a prepare step's output)."""
    head = re.split(r"[{*?\[]", spec_part.strip(), maxsplit=1)[0]
    try:
        return Path(head).resolve().is_relative_to(path.resolve())
    except (OSError, ValueError):
        return False
