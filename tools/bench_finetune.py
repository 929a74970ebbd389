"""Finetune speed on small labeled sets: what an epoch costs beyond its optimizer steps.

    python -m tools.bench finetune --json                                     # the demo's student settings
    python -m tools.bench finetune --model tf_efficientnet_lite2 --pretrained package --image-size 48 --json

The demo finetunes on 100 labeled images in batches of 32: 3 steps an epoch, 30 epochs. Whatever a run does
once per epoch (a new DataLoader and its worker processes, a save of the training state) is then as costly as
the steps themselves. Measured here, through `kt-student finetune`'s own library path (`run_finetune`, no
evaluation):

- `epoch_s`: (wall of `fit` in an E-epoch run - the same in a 1-epoch run) / (E - 1), so set-up, the
  labeled-subset scan and the final checkpoint stay out, and what `fit` does once per run cancels;
- `step_s`: the median of one optimizer step (forward, backward, AdamW) on a fixed batch, in-process;
- `overhead_per_epoch_s` = epoch_s - steps_per_epoch x step_s (rendering the views, loader start-up, saves).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kt.checkpoints import load_model
from kt.student.finetune import FinetuneConfig, classification_loss, run_finetune

DATA = Path(__file__).resolve().parent.parent / "data" / "fashion-mnist"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench finetune", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA / "train"))
    p.add_argument("--model", default="mobilevitv2_050")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--labels-per-class", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=12, help="the long run; the short one has 1 epoch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--step-repeats", type=int, default=10)
    return p


def _run(args, epochs: int, out: Path) -> float:
    cfg = FinetuneConfig(model=args.model, pretrained=args.pretrained, data=args.data,
                         labels_per_class=args.labels_per_class, image_size=args.image_size,
                         batch_size=args.batch_size, epochs=epochs, workers=args.workers, lr=2e-3, out=str(out))
    import kt.student.finetune as finetune_module

    timed = []
    real_fit = finetune_module.fit

    def timed_fit(*a, **k):  # the training loop alone: the labeled-subset scan varies with the disk cache
        start = time.perf_counter()
        result = real_fit(*a, **k)
        timed.append(time.perf_counter() - start)
        return result

    finetune_module.fit = timed_fit
    try:
        summary = run_finetune(cfg)
    finally:
        finetune_module.fit = real_fit
    assert summary["completed"], summary
    return timed[0]


def _step_s(args) -> float:
    model = load_model(args.model, num_classes=10, pretrained=args.pretrained, image_size=args.image_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = classification_loss(0.0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    times = []
    for i in range(args.step_repeats + 2):
        start = time.perf_counter()
        loss, _ = loss_fn(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        short = _run(args, 1, Path(tmp) / "short")
        long = _run(args, args.epochs, Path(tmp) / "long")
    epoch_s = (long - short) / (args.epochs - 1)
    steps = (args.labels_per_class * 10) // args.batch_size
    step_s = _step_s(args)
    return {"model": args.model, "image_size": args.image_size, "labeled_images": args.labels_per_class * 10,
            "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs,
            "fit_1_epoch_s": round(short, 2), f"fit_{args.epochs}_epochs_s": round(long, 2),
            "epoch_s": round(epoch_s, 3), "steps_per_epoch": steps, "step_s": round(step_s, 3),
            "overhead_per_epoch_s": round(epoch_s - steps * step_s, 3)}
