"""`kt-student train`: train a student from the teacher cache (or, as a baseline, with the teacher online).

    kt-student train --model mobilevitv2_050 --cache runs/cache.zarr --data data/fashion-mnist/train \
        --objective task --epochs 10 --out runs/student-distill
    kt-student train --model mobilevitv2_050 --teacher runs/teacher/checkpoint --data ... --objective task ...
    kt-student finetune --init runs/student-distill --data ... --labels-per-class 50 --out runs/student
    kt-student train --task segmentation --model mobilevitv2_050 --output-stride 8 --cache seg.zarr \
        --data D/transfer --objective task --out runs/seg/distill        # per-pixel KL (or patch-cosine)

The student sees each cached view re-rendered at its own input size from the stored parameters, so it
never loads the teacher; one cache serves any student architecture. The online mode renders the same
views (sampled from the seed) for both models and runs the teacher in the step: the baseline one would
write by hand, and the reference for `tools/bench.py distill`.

Segmentation: the cached per-pixel logits are in the teacher's grid of the same view; the objective
(`kt.student.losses.SegTaskObjective`) resizes them to the student's grid and leaves out the cells the view's
geometric ops filled in (the stream adds each view's validity mask, `kt.render.render_valid`).

Outputs in `--out`: `checkpoint/` (the student with its task head when the objective has one),
`objective.safetensors` (projection heads and temperature), config/run records, metrics, `state/`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kt.config import check_config, config_dict, field, write_run_record
from kt.errors import UserError, one_line
from kt.checkpoints import load_model, save_checkpoint
from kt.device import check_precision, model_device, placement
from kt.models import TaskModel, teacher_targets
from kt.shards import BadSamples, expand_shards, iter_samples, load_classes, parse_classes
from kt.views import ViewSet, load_view_spec
from kt.student.dataset import cache_source
from kt.student.learning import Learning
from kt.student.losses import DistillObjective, create_objective, objective_class
from kt.render import uint8_views
from kt.render_tensor import render_device_for
from kt.student.stream import (VIEW_POLICIES, ReplayStream, ShardData, StreamSpec, batch_sizes, normalize_views,
                               plan_epoch, render_sources, steps_per_epoch, stream_loader)
from kt.student.loop import (CHECKPOINT_DIR, RESUMABLE_CHANGES, OptimConfig, check_out_dir, create_accelerator, fit,
                             locks_run_folder)


# The peak learning rate that distilled a random-init student fastest at 64 samples a step (docs/results.md,
# "Distillation that converges": Lite0 at 32 px from an 88.8% teacher, 120,000 samples: 79.5% at 2e-3, 82.0 at 5e-3,
# 84.6 at 1e-2). Other global batches scale it by sqrt(batch / 64), as timm scales Adam-family learning rates.
DISTILL_LR_AT_64 = 1e-2


def distill_lr(cfg: "DistillConfig", processes: int) -> float:
    """`--lr`, or the measured default for this run's global batch (see `DISTILL_LR_AT_64`)."""
    if cfg.lr is not None:
        return cfg.lr
    return DISTILL_LR_AT_64 * math.sqrt(cfg.batch_size * cfg.grad_accum * processes / 64)


@dataclass
class DistillConfig(OptimConfig):
    lr: float | None = field(None, "AdamW peak learning rate after warm-up; None: 1e-2 x sqrt(global batch / 64), "
                                   "what distilled a random-init student fastest (docs/results.md)", min=0)
    warmup_epochs: float = field(0.1, "linear warm-up length; a random-init student at the default lr learned "
                                      "0.9 points more in 6 epochs with 0.1 than with 1 (docs/results.md)", min=0)
    model: str = field("mobilevitv2_050", "the student: any timm name")
    task: str = field("classification", "what the student learns: classification (logits) | segmentation "
                                        "(per-pixel logits on a restrided backbone, DeepLabV3 head)",
                      choices=("classification", "segmentation"))
    output_stride: int = field(8, "segmentation: input pixels per cell of the student's grid",
                               choices=(8, 16, 32))
    head_width: int = field(256, "segmentation: channels of the student's DeepLabV3 head (ASPP), 256 in the paper; "
                                 "on an 8x8 grid 128 costs 40% fewer FLOPs for MobileViT-V2-0.5", min=1)
    pretrained: str = field("none", "student initial weights: none | package | hub | PATH")
    cache: str = field("", "teacher cache (kt-cache build); or use --teacher for the online baseline")
    teacher: str = field("", "online-teacher mode: teacher checkpoint folder or model name (no cache)")
    teacher_pretrained: str = field("none", "weights when --teacher is a model name")
    data: str = field("", "transfer-set shards (the ones the cache was built from)")
    objective: str = field("task", "task | embedding-contrastive | patch-cosine (segmentation: task | patch-cosine)")
    temperature: float = field(1.0, "task objective: KL temperature (the loss is scaled by T^2)", gt=0)
    project_teacher: bool = field(False, "embedding-contrastive: also project the teacher side (DINOv2 variant)")
    view_policy: str = field("cycle", "which cached view an epoch uses: cycle (epoch mod V) | random (seeded)")
    views: int = field(4, "online mode: views per image to draw from (a cache fixes its own)", min=1)
    view_spec: str = field("", "expected view spec ('' accepts the cache's; online mode default: light, as kt-cache "
                               "build's)")
    view_seed: int = field(0, "online mode: view seed (a cache fixes its own)", min=0)
    expect_teacher: str = field("", "teacher checkpoint the cache must have been built from ('' skips)")
    expect_classes: str = field("", "classes.json or shard dir whose classes the teacher must have ('' skips)")
    teacher_precision: str = field("bf16", "online teacher on CUDA: bf16 autocast (the teacher dominates the step; "
                                           "fidelity in docs/benchmarks.md) | fp32; on CPU always fp32")
    image_size: int = field(64, "student input size; views are re-rendered at it", min=8)
    batch_size: int = field(64, "images per process per step", min=1)
    workers: int = field(2, "DataLoader workers rendering views", min=0)
    render: str = field("auto", "where views are rendered: auto (today the DataLoader workers: a GPU build "
                                "ran slower with the GPU path, docs/benchmarks.md) | cpu | cuda (the workers "
                                "only decode; the student's GPU renders, within 1/255 of the CPU render)",
                        choices=("auto", "cpu", "cuda"))
    val_data: str = field("", "labeled shards (not the transfer set's) to evaluate the student on as distilled: "
                              "top-1 (mIoU for segmentation) at the end, in OUT/learning.json beside the agreement "
                              "with the teacher per epoch, samples seen and CPU time ('' skips it)")
    eval_every: int = field(0, "with --val-data, also evaluate every N optimizer steps (OUT/learning.jsonl: the "
                               "learning curve); 0: at the end only", min=0)
    shuffle_shards: int = field(8, "shards each DataLoader worker reads at once and mixes into its batches "
                                   "(memory: about this many shards' images and targets per worker)", min=1)
    out: str = field("", "run folder")


class Distiller(nn.Module):
    """Student + objective as one module, so that DDP sees a single forward per step.

    The online teacher runs on its own device (where `run_distill` put it) at `teacher_precision`
    (`kt.device`); its targets come back as float32, as cached targets do.
    """

    def __init__(self, student: TaskModel, objective: DistillObjective, teacher: TaskModel | None = None,
                 teacher_precision: str = "bf16"):
        super().__init__()
        self.student, self.objective = student, objective
        self.teacher = [teacher]  # a list keeps it out of parameters(), state_dict() and DDP
        self.teacher_precision = teacher_precision

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        out = self.student.forward_features(batch["x"])
        targets = batch.get("targets")
        valid = batch.get("valid")  # per-pixel objectives: where the view shows the image
        if targets is None:
            teacher = self.teacher[0]
            place = placement(model_device(teacher), self.teacher_precision)
            with torch.inference_mode(), place.teacher_autocast():
                targets = teacher_targets(teacher, place.to(batch["teacher_x"]), self.objective.needs)
            # float32 copies made outside inference mode, so autograd may use them in the loss
            targets = {k: v.to(device=out["embedding"].device, dtype=torch.float32, copy=True)
                       for k, v in targets.items()}
        if valid is not None:
            targets = {**targets, "valid": valid}
        return self.objective(out, targets)


def target_dims(reader) -> dict[str, int]:
    """Sizes of what the cache holds, in `create_objective`'s terms (absent targets left out)."""
    shapes = {t: e["item_shape"] for t, e in reader.attrs["targets"].items()}
    dims = {}
    if "logits" in shapes:
        dims["num_classes"] = shapes["logits"][0]
    if "embedding" in shapes:
        dims["embedding"] = shapes["embedding"][0]
    if "patches" in shapes:
        dims["patches"] = shapes["patches"][-1]
    if "seg_logits" in shapes:  # (K, h, w), classes first
        dims["num_classes"] = shapes["seg_logits"][0]
    return dims


class FreshSource:
    """Online mode: keys of a data shard, views sampled from the seed, targets from the teacher in the step."""

    def __init__(self, keys_by_url: dict[str, list[str]]):
        self.keys_by_url = keys_by_url

    def __call__(self, url: str) -> ShardData:
        return ShardData(self.keys_by_url[url], None, None, None)


def shard_keys(urls) -> dict[str, list[str]]:
    """Keys of the decodable samples of each shard (one decoding pass; online mode and key checks)."""
    bad = BadSamples(max_fraction=1.0)
    out: dict[str, list[str]] = {u: [] for u in urls}
    for s in iter_samples(urls, bad=bad):
        out[s.shard].append(s.key)
    return out


def load_expected_classes(arg: str) -> list[str] | None:
    """Class names from a classes.json file or from the classes.json beside a shard spec."""
    if not arg:
        return None
    if arg.endswith(".json"):
        if not Path(arg).is_file():
            raise UserError(f"classes file not found: {arg}")
        return parse_classes(Path(arg).read_bytes(), arg)
    classes = load_classes(expand_shards(arg))
    if classes is None:
        raise UserError(f"no classes.json beside {arg}")
    return classes


# the task target each task's `task` objective distills from
TASK_TARGETS = {"classification": "logits", "segmentation": "seg_logits"}


def check_teacher_task(cfg: DistillConfig, teacher_task: str, what: str) -> None:
    """The task objective distills the teacher's task predictions: they must be of --task's kind. Features
    (patch-cosine, embedding-contrastive) are task-agnostic and may come from a teacher of either task."""
    if cfg.objective == "task" and teacher_task != cfg.task:
        raise UserError(f"--task {cfg.task} --objective task needs a {cfg.task} teacher's "
                        f"{TASK_TARGETS[cfg.task]}; {what} is from a {teacher_task} teacher")


def single_batch_epoch(spec: StreamSpec, epochs: int) -> int | None:
    """The first epoch whose plan has a batch of one sample (a worker's last batch), or None. Arithmetic on the
    plan, before anything runs."""
    for epoch in range(epochs):
        if min((n for r in range(spec.world_size) for n in batch_sizes(spec, epoch, r)), default=2) < 2:
            return epoch
    return None


def check_no_single_batches(spec: StreamSpec, epochs: int, student: nn.Module, image_size: int,
                            segmentation: bool) -> None:
    """Refuse a plan with a batch of one sample where the student cannot train on one: the ASPP pooling
    branch's BatchNorm never can; a classifier's BatchNorm cannot where its map is 1x1 (a CNN at a small input
    size), which a forward of one blank view in training mode, on a copy, tells. It failed mid-run before."""
    epoch = single_batch_epoch(spec, epochs)
    if epoch is None:
        return
    if segmentation:
        raise UserError(f"--task segmentation: epoch {epoch} would end with a batch of one sample (BatchNorm in "
                        "the ASPP pooling branch needs two); change --batch-size or --workers")
    probe = copy.deepcopy(student).train()  # training mode updates BatchNorm statistics: not the student's
    try:
        with torch.no_grad():
            probe(torch.zeros(1, 3, image_size, image_size))
    except ValueError as e:  # torch: "Expected more than 1 value per channel when training"
        raise UserError(f"epoch {epoch} would end with a batch of one sample, which {student.arch} cannot train "
                        f"on at {image_size} px ({one_line(e)}); change --batch-size or --workers") from None


@locks_run_folder
def run_distill(cfg: DistillConfig) -> dict:
    check_config(cfg)  # also when called as a library, not through build_config
    for name in ("data", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    if bool(cfg.cache) == bool(cfg.teacher):
        raise UserError("give exactly one of --cache (cached targets) and --teacher (online teacher)")
    objective_cls = objective_class(cfg.objective, cfg.task)
    segmentation = cfg.task == "segmentation"
    if segmentation and cfg.batch_size < 2:
        raise UserError("--task segmentation needs --batch-size >= 2: BatchNorm in the DeepLabV3 head's ASPP "
                        "pooling branch sees one value per channel in a batch of one")
    check_precision(cfg.teacher_precision)
    render_device_for(cfg.render)  # --render cuda without CUDA fails before the run folder is touched
    if cfg.view_policy not in VIEW_POLICIES:
        raise UserError(f"unknown --view-policy {cfg.view_policy!r}; choose from {', '.join(VIEW_POLICIES)}")
    out = Path(cfg.out)
    # the worker count is part of a distillation run: it decides the batch order (kt.student.stream)
    resuming = check_out_dir(out, cfg, resumable=(RESUMABLE_CHANGES | {"eval_every"}) - {"workers"})
    urls = expand_shards(cfg.data)
    val_urls = expand_shards(cfg.val_data) if cfg.val_data else None
    if val_urls and cfg.objective != "task":
        raise UserError(f"--val-data evaluates the student's task head, which --objective {cfg.objective} does not "
                        "train; evaluate after `kt-student finetune --init` instead")
    needs = objective_cls.needs
    accelerator = create_accelerator(cfg, out)
    rank, world = accelerator.process_index, accelerator.num_processes
    render_device = render_device_for(cfg.render, accelerator.device)
    expected_classes = load_expected_classes(cfg.expect_classes)

    teacher = None
    if cfg.cache:
        from kt.teacher_cache.reader import CacheReader

        expect = {}
        if cfg.view_spec:
            expect["view"] = {"spec": load_view_spec(cfg.view_spec).to_dict()}
        if expected_classes is not None:
            expect["classes"] = expected_classes
        if cfg.expect_teacher:
            from kt.checkpoints import checkpoint_fingerprint

            expect["teacher"] = checkpoint_fingerprint(cfg.expect_teacher)
        if expected_classes is not None:  # the count first: the message a mismatch deserves
            expect["num_classes"] = len(expected_classes)
        reader = CacheReader(cfg.cache, expect=expect or None)
        check_teacher_task(cfg, reader.task["task"], f"the cache {cfg.cache}")
        sizes, source = cache_source(reader, urls, needs, f"objective {cfg.objective}")
        view_set = reader.view_set
        teacher_dims = target_dims(reader)
        teacher_classes = reader.classes
    else:
        teacher = load_model(cfg.teacher, pretrained=cfg.teacher_pretrained, seed=0, what="teacher").eval()
        check_teacher_task(cfg, teacher.task, f"the teacher {cfg.teacher}")
        if expected_classes is not None and teacher.classes != expected_classes:
            raise UserError(f"teacher classes {teacher.classes} differ from the expected {expected_classes}")
        view_set = ViewSet(load_view_spec(cfg.view_spec or "light"), cfg.view_seed, cfg.views)
        keys = shard_keys(urls)
        sizes = [len(keys[u]) for u in urls]
        source = FreshSource(keys)
        teacher_dims = {"num_classes": teacher.num_classes, "embedding": teacher.embedding_dim,
                        "patches": teacher.grid_dim}
        teacher_classes = teacher.classes

    if val_urls and teacher_classes:
        from kt.student.evaluate import check_data_classes

        check_data_classes(teacher_classes, val_urls, "the teacher", f"--val-data {cfg.val_data}")
    if view_set.spec.mixes and (render_device is not None or segmentation):
        raise UserError(f"view spec mix {view_set.spec.mix!r}: mixed views are rendered by the DataLoader workers "
                        "(not --render cuda) for classification students")
    num_classes = teacher_dims.get("num_classes", 0) if cfg.objective == "task" else 0
    if segmentation and not num_classes:
        # a segmentation model has a head; patch-cosine does not train it (frozen below) and `finetune --init`
        # replaces it, so it takes the labeled classes where known and is a placeholder otherwise
        num_classes = len(expected_classes or []) or 1
    torch.manual_seed(cfg.seed)
    student = load_model(cfg.model, num_classes=num_classes or 0, pretrained=cfg.pretrained,
                         image_size=cfg.image_size, task=cfg.task,
                         output_stride=cfg.output_stride if segmentation else None, head_width=cfg.head_width,
                         what="--model")
    if student.task != cfg.task:
        raise UserError(f"--model {cfg.model} is a {student.task} model; --task {cfg.task} needs a {cfg.task} "
                        "model (a model name, or a checkpoint of that task)")
    if segmentation and cfg.objective != "task":
        student.head.requires_grad_(False)  # untrained by the objective; DDP would wait for its gradients
    student_dims = {"embedding": student.embedding_dim, "grid": student.grid_dim, "num_classes": student.num_classes}
    options = {"temperature": cfg.temperature} if cfg.objective == "task" else \
        {"project_teacher": cfg.project_teacher} if cfg.objective == "embedding-contrastive" else {}
    objective = create_objective(cfg.objective, student_dims, teacher_dims, task=cfg.task, **options)
    model = Distiller(student, objective, teacher, cfg.teacher_precision)
    if teacher is not None:
        teacher.to(accelerator.device)
    spec = StreamSpec(tuple(urls), tuple(sizes), cfg.batch_size, cfg.seed, rank, world, cfg.workers,
                      cfg.shuffle_shards)
    steps = steps_per_epoch(spec)
    # the exact batch count of every epoch (they differ by a few), so the cosine ends at its minimum
    per_epoch = [len(plan_epoch(spec, e)) for e in range(cfg.epochs)]
    if steps == 0:
        raise UserError("the transfer set is empty (or smaller than one batch per process)")
    check_no_single_batches(spec, cfg.epochs, student, student.image_size, segmentation)
    if not resuming and accelerator.is_main_process:
        write_run_record(out, cfg)

    def make_loader(epoch: int, skip: int):
        return stream_loader(ReplayStream(
            spec, epoch, skip, source, view_set, cfg.view_policy, cfg.image_size,
            student.mean, student.std, teacher_size=teacher.image_size if teacher is not None else 0,
            teacher_norm=(teacher.mean, teacher.std) if teacher is not None else None,
            valid=segmentation and cfg.objective == "task", device_render=render_device is not None, uint8=uint8),
            pin_memory=place.pin_memory)

    place = placement(accelerator.device)
    uint8 = render_device is None and uint8_views(place.device)  # uint8 views to a GPU, normalised there

    def loss_fn(modules, batch):
        teacher_norm = (teacher.mean, teacher.std) if teacher is not None else None
        if render_device is not None:
            batch = render_sources(batch, render_device, cfg.image_size, student.mean, student.std,
                                   teacher.image_size if teacher is not None else 0, teacher_norm)
        batch = place.to(batch)
        if uint8:
            batch = normalize_views(batch, student.mean, student.std, teacher_norm)
        return modules(batch)

    learning = Learning(out, cfg.batch_size * cfg.grad_accum * world, val_urls, cfg.eval_every, cfg.task,
                        accelerator.is_main_process, cfg.workers)

    def on_step(global_step: int, epoch: int, epoch_end: bool, metrics: dict) -> None:
        learning.observe(epoch, metrics)
        if epoch_end or (cfg.eval_every and val_urls and global_step % cfg.eval_every == 0):
            learning.record(global_step, epoch, student)

    lr = distill_lr(cfg, world)
    result = fit(dataclasses.replace(cfg, lr=lr), model, make_loader, per_epoch, loss_fn, out, accelerator=accelerator,
                 desc=f"distill {cfg.model} ({cfg.objective})", prepare_loader=False, loader_skips=True,
                 render_flag=True, on_step=on_step)
    summary = {"out": str(out), "model": cfg.model, "objective": cfg.objective, "completed": result.completed,
               "processes": world, "lr": lr, "steps": result.global_step, "steps_per_epoch": steps,
               "last": result.last_metrics}
    if result.completed:
        learned = learning.finish(result.global_step, cfg.epochs - 1, student)
        summary["learned"] = {k: learned[k] for k in ("samples", "cpu_s", "agree", "val_top1", "val_miou")
                              if k in learned}
    if result.completed and result.is_main_process:
        from safetensors.torch import save_file

        student = student.float().eval()
        classes = teacher_classes if num_classes and teacher_classes and len(teacher_classes) == num_classes else None
        save_checkpoint(student, out / CHECKPOINT_DIR, classes=classes,
                        extra={"run": config_dict(cfg), "distilled_from": cfg.cache or cfg.teacher})
        save_file({k: v.detach().contiguous() for k, v in objective.state_dict().items()},
                  str(out / "objective.safetensors"))
    return summary
