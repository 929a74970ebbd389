"""Evaluation: top-1, per-class accuracy and confusion matrix; mean +- std over repeated runs. A segmentation
checkpoint is evaluated by mIoU instead (`kt.student.segmentation`): the task comes from the checkpoint.

    kt-student eval --checkpoint runs/ft/checkpoint --data data/fashion-mnist/test
    kt-student eval --runs runs/ft-seed0 runs/ft-seed1 runs/ft-seed2
    kt-student eval --checkpoint runs/distill --data data/fashion-mnist/test --out runs/distill-eval/eval.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kt.config import field
from kt.device import CHANNELS_LAST_HELP, model_device, placement, resolve_device, set_channels_last
from kt.errors import UserError
from kt.render import model_input, uint8_views
from kt.student.data import eval_loader

METRICS_FILE = "eval.json"


@dataclass
class EvalConfig:
    """`kt-student eval`: one checkpoint on shards, or the mean +- std of finished runs."""

    checkpoint: str = field("", "run folder, checkpoint folder, or a model name")
    data: str = field("", "evaluation shards")
    runs: list = field([], "run folders to aggregate (mean +- std of their eval.json) instead of --checkpoint")
    batch_size: int = field(256, "images per forward pass", min=1)
    workers: int = field(2, "DataLoader workers decoding and rendering", min=0)
    device: str = field("auto", "auto (CUDA when present) | cpu | cuda | cuda:N")
    channels_last: bool = field(False, CHANNELS_LAST_HELP)
    max_bad_fraction: float = field(0.01, "segmentation: fail when more than this fraction of samples is bad "
                                          "(undecodable, mask missing or of another size)", min=0, max=1)
    out: str = field("", "also write the metrics to this JSON file, complete or not at all (a recipe's eval stage "
                         "reads it as a finetune's eval.json); '' prints only")


def run_eval(cfg: EvalConfig) -> dict:
    """What `kt-student eval` prints: the metrics of `cfg.checkpoint` on `cfg.data`, or the aggregate of `cfg.runs`;
    also written to `cfg.out` when given."""
    if cfg.out and Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a directory; give the JSON file to write")
    metrics = _eval(cfg)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(out)  # a reader never sees half a file: its presence says the evaluation finished
    return metrics


def _eval(cfg: EvalConfig) -> dict:
    if cfg.runs:
        return aggregate([load_run_metrics(r) for r in cfg.runs])
    if not cfg.checkpoint or not cfg.data:
        raise UserError("eval needs --checkpoint and --data, or --runs")
    from kt.checkpoints import load_model
    from kt.shards import expand_shards

    device = resolve_device(cfg.device)  # a bad device fails before the checkpoint loads
    urls = expand_shards(cfg.data)
    model = set_channels_last(load_model(cfg.checkpoint, what="--checkpoint").to(device), cfg.channels_last)
    check_data_classes(getattr(model, "classes", None), urls, f"the checkpoint {cfg.checkpoint}", cfg.data)
    if model.task == "segmentation":
        from kt.student.segmentation import evaluate_segmentation

        return evaluate_segmentation(model, urls, cfg.batch_size, cfg.workers, getattr(model, "classes", None),
                                     cfg.max_bad_fraction)
    return evaluate(model, urls, cfg.batch_size, cfg.workers, classes=getattr(model, "classes", None))


def check_data_classes(classes: Sequence[str] | None, urls: Sequence[str], model: str, data: str) -> None:
    """Refuse evaluation data whose classes.json names other classes than the model's: its labels index
    another list, so every metric would be named after the wrong classes (or its labels run past the head)."""
    from kt.shards import load_classes

    found = load_classes(urls)
    if found is None or classes is None or list(found) == list(classes):
        return
    unnamed = list(classes) == [str(i) for i in range(len(classes))]  # trained on data without classes.json
    if len(found) != len(classes):
        raise UserError(f"{data} has {len(found)} classes in its classes.json, {model} {len(classes)}; evaluate on "
                        "data labeled with the model's classes")
    if unnamed:  # its indices are all it knows: the data's names are the only ones there are
        return
    i = next(i for i, (a, b) in enumerate(zip(found, classes)) if a != b)
    raise UserError(f"{data}'s classes.json differs from {model}'s classes at index {i}: {found[i]!r} there, "
                    f"{classes[i]!r} in the model")


@torch.no_grad()
def predict(model, urls: Sequence[str], batch_size: int = 256,
            workers: int = 2) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(predicted class, label, key) of every sample of `urls`, sorted by key: the eval view at the model's input
    size, on the device the model's parameters live on (a finetuned model comes back from accelerate on its GPU).
    Two models' predictions on the same shards line up sample by sample (their agreement), whatever the worker
    count (which orders the loader's batches)."""
    from tqdm.auto import tqdm

    model.eval()
    k = model.num_classes
    if k <= 0:
        raise UserError(f"model {model.arch} has no task head to evaluate")
    place = placement(model_device(model))
    loader = eval_loader(urls, model.image_size, model.mean, model.std, batch_size, workers,
                         pin_memory=place.pin_memory, uint8=uint8_views(place.device))
    preds, labels, keys = [], [], []
    for x, y, key in tqdm(loader, desc="eval", unit="batch", mininterval=1.0, leave=False):
        preds.append(model(model_input(place.to(x), model.mean, model.std)).argmax(1).cpu().numpy())
        labels.append(y.numpy())
        keys.extend(key)
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, np.int64)
    pred = np.concatenate(preds)[order] if preds else np.zeros(0, np.int64)
    label = np.concatenate(labels)[order] if labels else np.zeros(0, np.int64)
    if (label < 0).any() or (label >= k).any():
        raise UserError(f"evaluation data has labels outside 0..{k - 1} (or none)")
    return pred, label, [keys[i] for i in order]


def evaluate(model, urls: Sequence[str], batch_size: int = 256, workers: int = 2,
             classes: Sequence[str] | None = None) -> dict:
    """Top-1, per-class accuracy and the confusion matrix of `predict`."""
    k = model.num_classes
    pred, y, _ = predict(model, urls, batch_size, workers)
    confusion = np.zeros((max(k, 0), max(k, 0)), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    n = int(confusion.sum())
    if n == 0:
        raise UserError("evaluation data holds no decodable samples")
    support = confusion.sum(1)
    per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    names = list(classes) if classes else [str(i) for i in range(k)]
    return {
        "top1": float(np.trace(confusion) / n),
        "n": n,
        "per_class_accuracy": {names[i]: (None if np.isnan(a) else float(a)) for i, a in enumerate(per_class)},
        "confusion_matrix": confusion.tolist(),
        "classes": names,
    }


def load_run_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise UserError(f"{run_dir} has no {METRICS_FILE} (was it finetuned with --val-data, or evaluated?)")
    return json.loads(path.read_text())


def aggregate(results: Sequence[dict]) -> dict:
    """Mean and sample standard deviation of top-1 (and per class) over repeated runs; of mIoU for
    segmentation runs."""
    if not results:
        raise UserError("no runs to aggregate")
    if all("miou" in r for r in results):
        from kt.student.segmentation import aggregate_miou

        return aggregate_miou(results)
    if any("miou" in r for r in results):
        raise UserError("--runs mixes segmentation and classification runs")
    top1 = np.array([r["top1"] for r in results])
    out = {"runs": len(results), "top1_mean": float(top1.mean()),
           "top1_std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0, "top1": top1.tolist()}
    classes = results[0].get("classes")
    if classes and all(r.get("classes") == classes for r in results):
        per = np.array([[r["per_class_accuracy"][c] for c in classes] for r in results], dtype=float)
        out["per_class_mean"] = dict(zip(classes, per.mean(0).tolist()))
    return out


def format_mean_std(agg: dict, scale: float = 100.0) -> str:
    return f"{agg['top1_mean'] * scale:.2f} ± {agg['top1_std'] * scale:.2f}"
