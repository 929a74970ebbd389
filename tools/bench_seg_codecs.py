"""Segmentation codecs: bytes per view and fidelity of cached per-pixel logits, fp16 against pixel-topk k=1/3/5/10.

    python -m tools.bench seg-codecs --json                              # a tiny teacher trained here
    python -m tools.bench seg-codecs --json --teacher runs/seg/teacher --data D/transfer   # a real one

For each codec it builds a cache of `seg_logits` (`kt-cache build`), and reports the bytes per view
`kt-cache plan` predicts, the bytes per view on disk after Zarr's compression, and `kt-cache verify`'s
fidelity on replayed views (KL(teacher || decoded) in nats, per pixel, and top-1 agreement). Plan bytes for
ADE20K's 150 classes on the same grid are added (a layout figure: no teacher needed).

The codec choice needs logits a finetuned teacher gives (a random head's are near uniform, where top-k loses
the most), so without --teacher the tool makes the embedded segmentation task's composites (`tools.fmnist_seg`:
real Fashion-MNIST garments on crops of the bundled photographs, 11 classes, `--image-size` px) and finetunes the
ImageNet EfficientNet-Lite2 at output stride 8 on it for `--steps` steps (per-pixel cross-entropy, plain
AdamW loop: the `kt-student finetune --task segmentation` command is another helper's work in progress).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

CODECS = ("fp16", "pixel-topk:k=1", "pixel-topk:k=3", "pixel-topk:k=5", "pixel-topk:k=10")
NUM_CLASSES = 11  # background + the 10 Fashion-MNIST garments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench seg-codecs", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="", help="segmentation teacher (run or checkpoint); default: train one here")
    p.add_argument("--data", default="", help="transfer shards (with --teacher); default: composites made here")
    p.add_argument("--codecs", default=",".join(CODECS), help="seg_logits codecs, comma-separated")
    p.add_argument("--images", type=int, default=64, help="transfer images made when no --data")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64, help="teacher input size of the tiny set")
    p.add_argument("--steps", type=int, default=150, help="finetuning steps of the tiny teacher")
    p.add_argument("--samples", type=int, default=64, help="views kt-cache verify re-runs through the teacher")
    p.add_argument("--work", default="", help="folder for the teacher, shards and caches (default: a temp dir)")
    return p


# ------------------------------------------------------------------------------------------- tiny set
def composites(n: int, size: int, seed: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 images and (n, size, size) uint8 masks (255: ignore) of the embedded
    segmentation task (`tools.fmnist_seg`, the shard maker's composites)."""
    from tools.fmnist_seg import CompositeSpec, Composer

    composer = Composer(CompositeSpec(size=size), seed)
    pairs = [composer.sample(split, i) for i in range(n)]
    return (np.stack([np.asarray(im.convert("RGB")) for im, _ in pairs]),
            np.stack([np.asarray(m) for _, m in pairs]))


def train_teacher(work: Path, size: int, steps: int) -> str:
    """The ImageNet Lite2 at output stride 8 with a DeepLabV3 head, finetuned briefly on composites."""
    import torch
    import torch.nn.functional as F

    from kt.checkpoints import save_checkpoint
    from kt.models import create_model
    from kt.student.losses import cross_entropy

    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite2", task="segmentation", num_classes=NUM_CLASSES, pretrained="package",
                         image_size=size, output_stride=8, head_width=64)
    images, masks = composites(512, size, seed=1, split="train")
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    x_all = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    y_all = torch.from_numpy(masks).long()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(x_all), (16,))
        logits = F.interpolate(model(x_all[idx]), size=(size, size), mode="bilinear", align_corners=False)
        loss = cross_entropy(logits, y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x_all[:128])
        labels = F.interpolate(y_all[:128, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        pixel_acc = float((logits.argmax(1) == labels).float().mean())
    from tools.fmnist_seg import class_names

    classes = class_names()
    path = save_checkpoint(model, work / "teacher" / "checkpoint", classes=classes,
                           extra={"bench": {"steps": steps, "final_loss": float(loss.detach()), "train_pixel_acc": pixel_acc}})
    return str(path)


def write_transfer(work: Path, n: int, size: int) -> str:
    from PIL import Image

    from kt.shards import write_shards

    images, _ = composites(n, size, seed=1, split="transfer")  # unlabeled: masks are not written
    urls = write_shards(((f"t{i:05d}", Image.fromarray(im), None) for i, im in enumerate(images)),
                        work / "transfer", prefix="transfer", maxcount=max(1, n // 2))
    return "::".join(urls)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------- run
def run(args) -> dict:
    import torch

    from kt.checkpoints import load_model
    from kt.teacher_cache.build import BuildConfig, build_cache, item_shapes
    from kt.teacher_cache.inspection import predict_size, verify_cache

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tmp = None
    if not args.work:
        tmp = tempfile.TemporaryDirectory(prefix="kt-seg-codecs-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher = args.teacher or train_teacher(work, args.image_size, args.steps)
    train_s = time.perf_counter() - start
    data = args.data or write_transfer(work, args.images, args.image_size)
    model = load_model(teacher, what="teacher").eval()
    shape = item_shapes(model, ["seg_logits"], model.image_size)["seg_logits"]
    rows = []
    for spec in [c for c in args.codecs.split(",") if c]:
        out = work / f"seg-{spec.replace(':', '-').replace('=', '')}.zarr"
        cfg = BuildConfig(teacher=teacher, data=data, out=str(out), views=args.views, targets=["seg_logits"],
                          codec=[f"seg_logits={spec}"], batch_size=32, workers=0, overwrite=True)
        summary = build_cache(cfg)
        n_views = summary["samples"] * args.views
        plan = predict_size({"seg_logits": (spec, shape)}, args.views, summary["samples"], 16)
        ade = predict_size({"seg_logits": (spec, (150,) + tuple(shape[1:]))}, 1, 1, 16)
        disk = sum(du(d / "targets" / "seg_logits") for d in (out / "shards").iterdir())
        fidelity = verify_cache(str(out), teacher=teacher, data=data, samples=args.samples)["fidelity"]["seg_logits"]
        cells = int(np.prod(shape[1:]))
        per_view = plan["targets"]["seg_logits"]["bytes_per_view"]
        rows.append({"codec": spec, "plan_bytes_per_view": per_view, "plan_bytes_per_cell": round(per_view / cells, 2),
                     "disk_bytes_per_view": round(disk / max(n_views, 1), 1),
                     "ade20k_plan_bytes_per_cell": round(ade["targets"]["seg_logits"]["bytes_per_view"] / cells, 2),
                     **{k: fidelity[k] for k in ("kl_mean", "kl_max", "top1_agreement") if k in fidelity}})
    card = model.card.get("extra", {}).get("bench", {}) if model.card else {}
    result = {"benchmark": "seg-codecs", "teacher": teacher if args.teacher else "tiny Lite2 OS8 trained here",
              "teacher_training": card, "teacher_train_s_under_load": round(train_s, 1), "item_shape": list(shape),
              "views": args.views, "codecs": rows}
    if tmp is not None:
        tmp.cleanup()
    return result
