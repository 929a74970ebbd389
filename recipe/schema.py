"""What a recipe file may say: typed dataclasses with a reason per field, read from YAML with every unknown
field refused by its path (`students[0].distil`), values typed as the commands' flags type them.

A recipe declares the method's inputs and choices; `kt.recipe.plan` turns it into the commands. The blocks
named after a command (`finetune`, `distill`, `cache`, `eval`, `retrieval.embed`, a transfer set's `curate`) are
that command's own fields, as its `--config FILE.yaml` takes them, and are checked against its config class
when the plan is made: a recipe passes only what it declares, and every other setting is the command's
default. `finetune` blocks may also hold `by_budget: {N: {field: value}}`, the fields that change with the
labeled budget (epochs, mostly).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt.config import check_config, field, load_yaml, yaml_value
from kt.errors import UserError
from kt.models import TASKS

OBJECTIVES = ("task", "embedding-contrastive", "patch-cosine")
# the stage kinds a launcher may start (the commands that run under `accelerate launch` / torchrun)
MULTI_PROCESS = ("finetune", "distill", "cache", "embed")


@dataclass
class Prepare:
    """A command that makes data the recipe reads (a shard maker), run once: when `creates` is missing."""

    creates: str = field("", "the path the command makes; the step is skipped when it exists", required=True)
    command: str = field("", "the command line; a leading `python` is this interpreter", required=True)


@dataclass
class Transfer:
    """A transfer set: shards of unlabeled images, or a set `kt-retrieve curate` selects from the gallery."""

    shards: str = field("", "shard spec of the set ('' when `curate` makes it)")
    curate: dict = field({}, "kt-retrieve curate fields (strategy, size, seed, ...): the set is curated from "
                             "retrieval.gallery with retrieval.queries")
    label: str = field("", "its name in the report ('' : its key)")
    rows: bool = field(True, "the rows distill over it; false: only curve points name it")


@dataclass
class Data:
    labeled: str = field("", "labeled shards: the finetunes' --data (each takes its budget's subset)", required=True)
    test: str = field("", "evaluation shards: every finetune's --val-data and every as-distilled eval", required=True)
    transfer: dict = field({}, "name: shard spec or Transfer mapping; the transfer sets, in the report's order")


@dataclass
class TeacherVariant:
    """Another finetuning recipe for the teacher, compared at the first budget (its own report table)."""

    label: str = field("", "its row in the report", required=True)
    image_size: int = field(0, "input size (0: the teacher's)", min=0)
    finetune: dict = field({}, "kt-student finetune fields over the teacher's")


@dataclass
class Teacher:
    model: str = field("", "the foundation model: a timm name, open_clip:ARCH[@TAG], or a checkpoint", required=True)
    pretrained: str = field("", "its weights: none | package | hub | PATH ('' : the command's default)")
    image_size: int = field(0, "its input size, finetuned and cached at", required=True, min=8)
    seeds: list[int] = field([0], "one teacher per budget and seed; the caches use the first seed's", min=0)
    pool: str = field("", "labeled shards the teacher finetunes on instead of each budget's subset of data.labeled: "
                          "one teacher for every budget, stronger than the students' labels make it (labels standing "
                          "in for what a foundation model knows); keep it disjoint from the transfer sets")
    pool_size: int = field(0, "of the pool, the images per class (classification) or images (segmentation) the "
                              "teacher takes, a seeded subset as a budget's (0: all)", min=0)
    finetune: dict = field({}, "kt-student finetune fields of the teacher's finetune (+ by_budget)")
    variants: list[TeacherVariant] = field([], "other finetuning recipes, compared at the first budget")


@dataclass
class StudentVariant:
    """An objective's row again with other finetune settings (e.g. init_head: new)."""

    label: str = field("", "its row in the report", required=True)
    objective: str = field("task", "the distillation it finetunes from", choices=OBJECTIVES)
    budgets: list[int] = field([], "the budgets it runs at ([]: all)", min=1)
    finetune: dict = field({}, "kt-student finetune fields over the student's")


@dataclass
class CurvePoint:
    transfer: str = field("", "the transfer set (a data.transfer name) it distills over", required=True)
    epochs: int = field(0, "distillation epochs (0: the distill block's)", min=0)
    cache: str = field("", "the transfer set whose task cache it reads ('' : its own); a cache over more shards "
                           "serves a subset of them")
    finetune: bool = field(False, "also finetune every seed from this distillation (a row of the student's table)")


@dataclass
class Curve:
    """The task-oriented student distilled over other transfer sets and lengths, evaluated as distilled."""

    budget: int = field(0, "the teacher's budget (0: the first)", min=0)
    points: list[CurvePoint] = field([], "one distillation each", required=True)


@dataclass
class Student:
    model: str = field("", "the small model: a timm name", required=True)
    image_size: int = field(0, "its input size, distilled and finetuned at", required=True, min=8)
    pretrained: str = field("", "its initial weights ('' : the commands' default, random init)")
    objectives: list[str] = field([], "distillations, each then finetuned: task (the teacher's predictions), "
                                      "embedding-contrastive or patch-cosine (the pretrained teacher's features)",
                                  choices=OBJECTIVES)
    distill: dict = field({}, "kt-student train fields over the recipe's distill block")
    finetune: dict = field({}, "kt-student finetune fields over the recipe's finetune block (+ by_budget)")
    evaluate_distilled: list[str] = field([], "objectives whose distilled student is also evaluated as it is",
                                          choices=OBJECTIVES)
    variants: list[StudentVariant] = field([], "rows finetuned from a distillation with other settings")
    curve: Curve | None = field(None, "the transfer-growth curve of its task objective")


@dataclass
class ImPretrain:
    model: str = field("", "a model with pretrained weights", required=True)
    pretrained: str = field("", "its weights: package | hub | PATH", required=True)
    image_size: int = field(0, "its input size", required=True, min=8)
    label: str = field("", "its row in the report ('' : IM-Pretrain (MODEL))")
    finetune: dict = field({}, "kt-student finetune fields over the recipe's finetune block (+ by_budget)")


@dataclass
class Baselines:
    labels: bool = field(True, "each student finetuned from its initial weights on the labels alone")
    labels_finetune: dict = field({}, "kt-student finetune fields of those runs, over the student's")
    im_pretrain: list[ImPretrain] = field([], "pretrained models finetuned on the labels (where weights exist); in "
                                              "the table of the student of the same model, else in every table")


@dataclass
class Retrieval:
    """Curated transfer sets: the gallery and the queries embedded once, then one curate per curated set."""

    gallery: str = field("", "shard spec of the candidate images", required=True)
    queries: str = field("", "shard spec of the query images (the labeled images)", required=True)
    encoder: str = field("", "kt-retrieve embed --encoder", required=True)
    pretrained: str = field("", "its weights ('' : the command's default)")
    embed: dict = field({}, "kt-retrieve embed fields of both embeddings")


@dataclass
class Report:
    title: str = field("", "the report's heading ('' : the recipe file's name)")
    note: str = field("", "text under the tables (what the numbers need to be read with)")
    teacher_row: bool = field(True, "the finetuned teacher as a row of every table")


@dataclass
class Recipe:
    out: str = field("", "folder of every stage (run folders, caches, logs) and of the report", required=True)
    task: str = field("classification", "what the labels are: classification (.cls) or segmentation (masks)",
                      choices=TASKS)
    budgets: list[int] = field([], "labeled budgets: images per class (classification) or images (segmentation)",
                               required=True, min=1)
    seeds: list[int] = field([0], "finetune seeds; each seed also picks its own labeled subset", min=0)
    prepare: list[Prepare] = field([], "commands that make the data, in order, each once")
    data: Data | None = field(None, "the labeled, test and transfer shards", required=True)
    teacher: Teacher | None = field(None, "the foundation model and its finetuning (needed by any objective)")
    cache: dict = field({}, "kt-cache build fields of every cache (views, seed, codec, batch_size, ...)")
    students: list[Student] = field([], "small models x objectives")
    finetune: dict = field({}, "kt-student finetune fields of every student and baseline finetune (+ by_budget)")
    distill: dict = field({}, "kt-student train fields of every distillation")
    eval: dict = field({}, "kt-student eval fields of the as-distilled evaluations")
    baselines: Baselines = dataclasses.field(default_factory=Baselines, metadata={"help": "labels only; IM-Pretrain"})
    retrieval: Retrieval | None = field(None, "needed by transfer sets that are curated")
    report: Report = dataclasses.field(default_factory=Report,
                                       metadata={"help": "report.md, report.png, results.json"})
    launcher: str = field("", "the command that starts a multi-process stage, e.g. `accelerate launch --multi_gpu "
                              "--num_processes 8`; '' runs every stage in this process")
    launch: list[str] = field(list(MULTI_PROCESS), "the stage kinds the launcher starts", choices=MULTI_PROCESS)
    jobs: int = field(1, "stages run at once; above 1 each runs as a subprocess with one torch thread (small models "
                         "on few cores use them better as processes)", min=1)


def load_recipe(path: str | Path) -> Recipe:
    """The recipe in `path`, typed and range-checked; a `UserError` names the first bad field by its path."""
    path = Path(path)
    return from_mapping(Recipe, load_yaml(path), f"{path}: ")


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """`cls` from a YAML mapping; `where` prefixes every field path in messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where.rstrip(': .')}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"{where}{unknown[0]}: unknown field (valid: {', '.join(names)})")
    values = {k: _value(hints[k], v, f"{where}{k}") for k, v in data.items()}
    obj = cls(**values)
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and getattr(obj, f.name) in (None, "", [], {}, 0):
            raise UserError(f"{where}{f.name} is required ({f.metadata['help']})")
    check_config(obj, lambda name: f"{where}{name}")
    return obj


def _value(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, f"{where}.")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    return yaml_value(tp, value, where)


def transfer_sets(data: Data, where: str = "data.transfer") -> dict[str, Transfer]:
    """`data.transfer` typed: a name maps to a shard spec or a `Transfer` mapping."""
    out = {}
    for name, value in data.transfer.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: a transfer set needs a name, got {name!r}")
        t = from_mapping(Transfer, {"shards": value} if isinstance(value, str) else value, f"{where}.{name}.")
        if bool(t.shards) == bool(t.curate):
            raise UserError(f"{where}.{name}: give its shards or a curate mapping (one of them)")
        out[name] = t
    return out
