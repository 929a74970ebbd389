"""Segmentation pieces of `kt-student finetune --task segmentation` and `kt-student eval` (mIoU).

    kt-student finetune --task segmentation --model tf_efficientnet_lite2 --pretrained package --output-stride 8 \
        --data D/train --val-data D/test --labeled-images 200 --out runs/seg/teacher
    kt-student eval --checkpoint runs/seg/teacher --data D/test     # miou, pixel_accuracy, per_class_iou, n

Training: each labeled image and its mask are rendered with the same view parameters (`kt.render.render` and
`render_mask`: nearest, pixels brought in by rotate/shear/translate get the ignore label), and the loss is
per-pixel cross-entropy on the logits upsampled bilinearly to the input size (`align_corners=False`), the
practice of DeepLabV3 and torchvision's `_SimpleSegmentationModel`: the head predicts on the stride-8 grid,
the labels stay at full resolution. The ignore label is left out; a batch of nothing but ignore gives a loss
of 0, not nan (`kt.student.losses.cross_entropy`).

Evaluation: each whole image is resized to the model's input size (no centre crop, which would drop labeled
border pixels), its logits upsampled to its mask's own size, and every pixel of the set goes into ONE confusion
matrix; IoU per class = TP / (TP + FP + FN) from it, and mIoU the mean over the classes present in the ground
truth (a class absent from it is reported as null and left out: its IoU is undefined, not 0). This is the
standard "accumulate over the dataset" mIoU (mmsegmentation, torchvision's reference scripts), not a mean of
per-image IoUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kt.errors import UserError
from kt.render import model_input, render, render_mask, uint8_views, worker_tensor
from kt.masks import ignore_label
from kt.shards import BadSamples, Sample, iter_samples, labeled_images, split_urls
from kt.views import ViewSpec, sample_params
from kt.student.data import LabeledViews
from kt.student.losses import cross_entropy

# the whole image at the model's input size: an eval view without the classification centre crop
SEG_EVAL_VIEW = ViewSpec(kind="eval", crop_pct=1.0)


# ------------------------------------------------------------------------------------- checks
def checkpoint_task(spec: str) -> str | None:
    """The task of the checkpoint `spec` names (run or checkpoint folder), None when it names none."""
    from kt.checkpoints import checkpoint_fingerprint, checkpoint_folder

    if not spec or not Path(spec).expanduser().exists() or checkpoint_folder(spec) is None:
        return None
    return checkpoint_fingerprint(spec)["task"]


def check_task(spec: str, task: str, flag: str) -> None:
    """Refuse a checkpoint of the other task (its head and its outputs mean something else)."""
    found = checkpoint_task(spec)
    if found is not None and found != task:
        raise UserError(f"{flag} {spec} is a {found} checkpoint; this is a {task} run")


def check_batch(batch_size: int, labeled: int) -> None:
    """BatchNorm in the ASPP pooling branch sees one value per channel per image: a batch of 1 cannot train."""
    if min(batch_size, labeled) < 2:
        raise UserError(f"segmentation training needs batches of 2 or more (the DeepLabV3 head's image-pooling "
                        f"BatchNorm cannot train on a batch of 1): --batch-size {batch_size}, {labeled} labeled "
                        "image(s)")


# ------------------------------------------------------------------------------------- training
def labeled_masks(urls: Sequence[str], n: int | None, seed: int, bad: BadSamples,
                  classes: list[str] | None) -> list[Sample]:
    """The labeled images and their masks (`--labeled-images`; --labels-per-class does not apply: a mask holds
    many classes)."""
    if not classes:
        raise UserError(f"segmentation data needs {'classes.json'} beside its shards (every class, background "
                        f"included): none beside {urls[0]}")
    return labeled_images(urls, n, seed, bad, mask_classes=len(classes))


class SegmentationViews(LabeledViews):
    """In-memory labeled images with masks; item `(i, epoch)` is image i's view `epoch` and the same view of
    its mask (int64, the ignore label where the view shows no labeled pixel)."""

    def __init__(self, samples: Sequence[Sample], spec: ViewSpec, seed: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], num_classes: int, uint8: bool = False):
        super().__init__(samples, spec, seed, image_size, mean, std, uint8)
        self.ignore = ignore_label(num_classes)

    def __getitem__(self, item: tuple[int, int]):
        s, params, x = self.view(*item)
        mask = render_mask(s.mask, params, self.image_size, fill=self.ignore)
        return x, torch.from_numpy(np.asarray(mask, dtype=np.int64))


def segmentation_loss(ignore_index: int, label_smoothing: float = 0.0):
    """Per-pixel cross-entropy on logits upsampled to the labels' size; `pixel_acc` over labeled pixels."""

    def loss_fn(model, batch):
        x, y = batch
        logits = F.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = cross_entropy(logits, y, label_smoothing, ignore_index)
        valid = y != ignore_index
        correct = ((logits.detach().argmax(1) == y) & valid).sum()
        return loss, {"pixel_acc": float(correct / valid.sum().clamp_min(1))}

    return loss_fn


# ------------------------------------------------------------------------------------- evaluation
def accumulate_confusion(confusion: np.ndarray, pred: np.ndarray, truth: np.ndarray, ignore: int) -> None:
    """Add one image's pixels to `confusion` (rows: truth, columns: prediction), ignore-label pixels left out."""
    k = confusion.shape[0]
    valid = truth != ignore
    index = truth[valid].astype(np.int64) * k + pred[valid].astype(np.int64)
    confusion += np.bincount(index, minlength=k * k).reshape(k, k)


def segmentation_metrics(confusion: np.ndarray, classes: Sequence[str]) -> dict:
    """mIoU, pixel accuracy and per-class IoU from one confusion matrix over the whole set."""
    pixels = int(confusion.sum())
    if pixels == 0:
        raise UserError("evaluation data holds no labeled pixels")
    tp = np.diag(confusion).astype(np.float64)
    truth, predicted = confusion.sum(1), confusion.sum(0)
    present = truth > 0
    iou = tp / np.maximum(truth + predicted - tp, 1)
    return {
        "miou": float(iou[present].mean()),
        "pixel_accuracy": float(tp.sum() / pixels),
        "per_class_iou": {c: (float(iou[i]) if present[i] else None) for i, c in enumerate(classes)},
        "pixels": pixels,
        "classes": list(classes),
    }


class SegEvalStream(IterableDataset):
    """Every sample of the shards as a dict: `x` (the whole image at `image_size`), `mask` (int64 at its own
    size), `key`; a bad sample as `{"bad": record}`, a refusal as `{"error": line}`, so the main process counts
    and refuses (an exception raised in a worker would come back as a traceback)."""

    def __init__(self, urls: Sequence[str], image_size: int, mean, std, num_classes: int, uint8: bool = False):
        self.urls, self.image_size, self.mean, self.std, self.k = list(urls), image_size, mean, std, num_classes
        self.uint8 = uint8  # uint8 images, for the consumer to normalise on its device

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        bad = BadSamples(max_fraction=1.0)
        reported = 0
        try:
            for s in iter_samples(split_urls(self.urls, 0, 1, wid, nw), bad=bad, mask_classes=self.k):
                for record in bad.bad[reported:]:
                    yield {"bad": record}
                reported = len(bad.bad)
                view = render(s.image, sample_params(SEG_EVAL_VIEW, 0, s.key, 0), self.image_size)
                x = worker_tensor(view, self.mean, self.std, self.uint8)
                yield {"x": x, "mask": np.asarray(s.mask, dtype=np.int64), "key": s.key}
        except UserError as e:
            yield {"error": str(e)}
            return
        for record in bad.bad[reported:]:
            yield {"bad": record}


def _items(batch: list[dict]) -> list[dict]:
    return batch  # masks differ in size: the main process stacks the images itself


@torch.no_grad()
def evaluate_segmentation(model, urls: Sequence[str], batch_size: int = 16, workers: int = 2,
                          classes: Sequence[str] | None = None, max_bad_fraction: float = 0.01) -> dict:
    """mIoU of `model` over every sample of `urls` (see the module docstring), on the model's device."""
    from tqdm.auto import tqdm

    from kt.device import model_device, placement

    model.eval()
    k = model.num_classes
    names = list(classes) if classes else [str(i) for i in range(k)]
    if len(names) != k:
        raise UserError(f"the model has {k} classes, the data {len(names)}")
    ignore = ignore_label(k)
    place = placement(model_device(model))
    confusion = np.zeros((k, k), dtype=np.int64)
    bad = BadSamples(max_bad_fraction)
    workers = min(workers, len(urls))
    uint8 = uint8_views(place.device)  # uint8 images to a GPU, normalised there (kt.render.UINT8_VIEWS)
    loader = DataLoader(SegEvalStream(urls, model.image_size, model.mean, model.std, k, uint8), batch_size=batch_size,
                        num_workers=workers, collate_fn=_items)
    images = 0
    # disable=None: no bar where stderr is not a terminal (logs, pipes), so a refusal there is its one line
    for batch in tqdm(loader, desc="eval", unit="batch", mininterval=1.0, leave=False, disable=None):
        good = []
        for item in batch:
            if "error" in item:
                raise UserError(item["error"])
            if "bad" in item:
                bad.record(item["bad"]["shard"], item["bad"]["key"], item["bad"]["reason"])
            else:
                good.append(item)
        if not good:
            continue
        x = model_input(place.to(torch.stack([g["x"] for g in good])), model.mean, model.std)
        logits = model(x).float()
        for i, item in enumerate(good):
            mask = item["mask"]
            up = F.interpolate(logits[i:i + 1], size=mask.shape, mode="bilinear", align_corners=False)
            accumulate_confusion(confusion, up.argmax(1)[0].cpu().numpy(), mask, ignore)
            bad.ok()
        images += len(good)
    bad.check()
    if images == 0:
        raise UserError("evaluation data holds no decodable samples")
    return {**segmentation_metrics(confusion, names), "n": images, "bad_samples": len(bad.bad)}


def aggregate_miou(results: Sequence[dict]) -> dict:
    """Mean and sample standard deviation of mIoU (and pixel accuracy) over repeated runs."""
    out: dict = {"runs": len(results)}
    for name in ("miou", "pixel_accuracy"):
        values = np.array([r[name] for r in results], dtype=float)
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[name] = values.tolist()
    return out
