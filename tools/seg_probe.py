"""Probe: what makes a segmentation model learn fmnist-seg at demo scale (a minimal loop, not kt's).

    OMP_NUM_THREADS=1 python -m tools.seg_probe --model mobilevitv2_050 --steps 600 --size 64 --labeled 200
    OMP_NUM_THREADS=1 python -m tools.seg_probe --model tf_efficientnet_lite0 --pretrained package ...

A from-scratch MobileViT-V2-0.5 at output stride 8 predicted only background (6.8 mIoU) after 620 labeled
steps at 64 px. This probe sweeps the knobs that could explain it (steps, image size, garment size, loss
weighting, lr and warm-up, head width) cheaply: composites are drawn in memory by tools.fmnist_seg (the
shard maker's own `Composer`, so the data is the demo's), and the loop is a plain torch loop on kt's models,
so a setting costs minutes, not a shard build and a run folder. It prints one JSON line per evaluation:
mIoU (one confusion matrix over the set, 255 ignored, classes absent from the ground truth left out, as
the issue defines it), pixel accuracy, and the share of pixels predicted as background (the symptom).
The mIoU here is written out because `kt-student eval --task segmentation` is another branch's work; the
demo uses that command, not this.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from kt.models import create_model
from tools.fmnist_seg import IGNORE, Composer, CompositeSpec

NUM_CLASSES = 11
# class weights of the cross-entropy: none (plain CE), inverse square root or inverse pixel frequency
# (normalised to mean 1 over the classes present), counted on the labeled masks
WEIGHTINGS = ("none", "inv-sqrt", "inv")


def composites(spec: CompositeSpec, split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    composer = Composer(spec, seed)
    pairs = [composer.sample(split, i) for i in range(count)]
    images = torch.from_numpy(np.stack([np.asarray(im) for im, _ in pairs])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([np.asarray(m) for _, m in pairs])).long()
    return images, masks


def class_weights(masks: torch.Tensor, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = torch.bincount(masks[masks != IGNORE].ravel(), minlength=NUM_CLASSES).float()
    freq = counts / counts.sum()
    w = torch.where(counts > 0, freq.clamp_min(1e-6) ** (-0.5 if mode == "inv-sqrt" else -1.0), torch.zeros(()))
    return w / w[counts > 0].mean()


def miou(confusion: np.ndarray) -> tuple[float, list[float]]:
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = confusion.sum(1) > 0  # classes absent from the ground truth are left out
    iou = np.where(union > 0, tp / np.maximum(union, 1), 0.0)
    return float(iou[present].mean()), [round(float(x), 4) for x in iou]


@torch.no_grad()
def evaluate(model, images, masks, mean, std, size: int, batch: int = 64) -> dict:
    model.eval()
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for i in range(0, len(images), batch):
        x = prepare(images[i:i + batch], mean, std, size)
        logits = model.forward_features(x)["seg_logits"]
        m = masks[i:i + batch]
        pred = F.interpolate(logits, size=m.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        keep = m != IGNORE
        confusion += np.bincount((m[keep] * NUM_CLASSES + pred[keep]).numpy(),
                                 minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
    model.train()
    value, per_class = miou(confusion)
    return {"miou": round(100 * value, 2), "pixel_acc": round(100 * np.trace(confusion) / confusion.sum(), 2),
            "pred_background": round(100 * confusion[:, 0].sum() / confusion.sum(), 2), "iou": per_class}


def prepare(images: torch.Tensor, mean, std, size: int) -> torch.Tensor:
    x = images.float() / 255
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def random_resized_crop(x: torch.Tensor, y: torch.Tensor, min_scale: float, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Inception-style crops (area share in [min_scale, 1], aspect 3/4..4/3) back to full size, as kt's "light"
    view does: images bilinear, masks nearest (torchvision's functional ops, per image)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resized_crop

    size = list(x.shape[-2:])
    xs, ys = [], []
    for xi, yi in zip(x, y):
        area = rng.uniform(min_scale, 1.0) * size[0] * size[1]
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h = min(size[0], int(round(math.sqrt(area / aspect))))
        w = min(size[1], int(round(math.sqrt(area * aspect))))
        top, left = int(rng.integers(0, size[0] - h + 1)), int(rng.integers(0, size[1] - w + 1))
        xs.append(resized_crop(xi, top, left, h, w, size, antialias=True))
        ys.append(resized_crop(yi[None], top, left, h, w, size, interpolation=InterpolationMode.NEAREST)[0])
    return torch.stack(xs), torch.stack(ys)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    spec = CompositeSpec(size=args.data_size, scale=tuple(args.scale), garments=tuple(args.garments))
    train_x, train_y = composites(spec, "train", args.labeled, args.data_seed)
    test_x, test_y = composites(spec, "test", args.test, args.data_seed)
    model = create_model(args.model, num_classes=NUM_CLASSES, pretrained=args.pretrained, image_size=args.size,
                         task="segmentation", output_stride=8, head_width=args.head_width)
    weights = class_weights(train_y, args.weighting)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)

    def lr_at(step):  # linear warm-up, cosine decay: the kt loop's schedule
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(args.seed)
    start, log = time.time(), []
    for step in range(args.steps):
        idx = rng.choice(len(train_x), size=args.batch, replace=len(train_x) < args.batch)
        x, y = train_x[idx], train_y[idx]
        flip = torch.from_numpy(rng.random(args.batch) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
        if args.crop_scale < 1:
            x, y = random_resized_crop(x, y, args.crop_scale, rng)
        logits = model.forward_features(prepare(x, model.mean, model.std, args.size))["seg_logits"]
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            result = {"step": step + 1, "loss": round(float(loss), 4), "s": round(time.time() - start, 1),
                      **evaluate(model, test_x, test_y, model.mean, model.std, args.size)}
            log.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "iou"}), flush=True)
    final = {"config": {k: v for k, v in vars(args).items()}, **log[-1], "curve": [(r["step"], r["miou"]) for r in log]}
    print(json.dumps(final), flush=True)
    return final


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seg_probe", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilevitv2_050")
    p.add_argument("--pretrained", default="none", choices=("none", "package"))
    p.add_argument("--size", type=int, default=64, help="model input side (composites are resized to it)")
    p.add_argument("--data-size", type=int, default=64, help="side the composites are drawn at")
    p.add_argument("--scale", type=float, nargs=2, default=CompositeSpec.scale, help="garment side / image side")
    p.add_argument("--garments", type=int, nargs=2, default=CompositeSpec.garments)
    p.add_argument("--labeled", type=int, default=200)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weighting", default="none", choices=WEIGHTINGS)
    p.add_argument("--head-width", type=int, default=256)
    p.add_argument("--crop-scale", type=float, default=1.0,
                   help="random resized crops of this minimum area share (kt's light view: 0.35); 1: flips only")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    torch.set_num_threads(1)
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
