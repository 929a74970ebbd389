"""Segmentation models: parameters and FLOPs of each backbone at output stride 8 and of its DeepLabV3 head.

    python -m tools.bench seg-models --json
    python -m tools.bench seg-models --json --image-size 256 --models fastvit_s12,mobilevitv2_050

Each model is built by `kt.models.create_model(task="segmentation")` with random weights and moved to the
meta device, so the count costs no compute and no memory at any size: `torch.utils.flop_counter.
FlopCounterMode` counts from shapes (a multiply-add is 2 FLOPs; matmuls, convolutions and attention are
counted, elementwise ops are not). Figures are per image (batch 1), the backbone pass (embedding and grid)
and the head on the grid apart.

`speed` (skip with --no-speed) times the segmentation path on the CPU at a small input (`--speed-size`, random
weights, composites made by `tools.bench_seg_codecs`): `kt-cache build` images/s of seg_logits for each
`--build-teachers` model at output stride 8 (one view per image), `kt-student train --task segmentation` steps/s
of `--student` from the first teacher's cache (the run's wall time, start-up included), and eval images/s of
the student (forward, bilinear upsampling of the logits to the input size, argmax). Threads: OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse

import torch

MODELS = ("mobilevitv2_050", "fastvit_s12", "tf_efficientnet_lite0", "tf_efficientnet_lite2",
          "vit_small_patch14_dinov2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench seg-models", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="model names, comma-separated")
    p.add_argument("--image-size", type=int, default=512, help="input size (divisible by the output stride)")
    p.add_argument("--output-stride", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=150, help="head outputs (ADE20K: 150)")
    p.add_argument("--head-width", type=int, default=256)
    p.add_argument("--no-speed", action="store_true", help="counts only: skip the CPU timings")
    p.add_argument("--build-teachers", default="tf_efficientnet_lite2,vit_small_patch14_dinov2")
    p.add_argument("--student", default="mobilevitv2_050")
    p.add_argument("--speed-size", type=int, default=64, help="input size of the timings")
    p.add_argument("--speed-images", type=int, default=64, help="transfer images of the timings")
    p.add_argument("--batch-size", type=int, default=8, help="build, distillation and eval batch")
    return p


def run(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from kt.models import create_model

    rows = []
    for name in [m for m in args.models.split(",") if m]:
        model = create_model(name, task="segmentation", num_classes=args.num_classes, image_size=args.image_size,
                             output_stride=args.output_stride, head_width=args.head_width).eval()
        grid = model.grid_size(args.image_size)
        model = model.to("meta")
        x = torch.empty(1, 3, args.image_size, args.image_size, device="meta")
        with torch.no_grad():
            with FlopCounterMode(display=False) as backbone_count:
                _, features = model.embed_and_grid(x)
            with FlopCounterMode(display=False) as head_count:
                logits = model.head(features)
        rows.append({
            "model": name,
            "grid": list(grid),
            "seg_logits_shape": list(logits.shape),
            "backbone_params_m": round(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 3),
            "head_params_m": round(sum(p.numel() for p in model.head.parameters()) / 1e6, 3),
            "backbone_gflops": round(backbone_count.get_total_flops() / 1e9, 2),
            "head_gflops": round(head_count.get_total_flops() / 1e9, 2),
        })
    out = {"benchmark": "seg-models", "image_size": args.image_size, "output_stride": args.output_stride,
           "num_classes": args.num_classes, "head_width": args.head_width, "models": rows}
    if not args.no_speed:
        out["speed"] = speed(args)
    return out


def speed(args) -> dict:
    """CPU timings of build, distillation and eval at `args.speed_size` (see the module docstring)."""
    import tempfile
    import time
    from pathlib import Path

    from PIL import Image

    from kt.checkpoints import save_checkpoint
    from kt.models import create_model
    from kt.shards import write_shards
    from kt.student.distill import DistillConfig, run_distill
    from kt.teacher_cache.build import BuildConfig, build_cache
    from tools.bench_seg_codecs import NUM_CLASSES, composites

    size, batch = args.speed_size, args.batch_size
    result: dict = {"image_size": size, "output_stride": args.output_stride, "threads": torch.get_num_threads(),
                    "build_images_per_s": {}}
    with tempfile.TemporaryDirectory(prefix="kt-seg-speed-") as tmp:
        work = Path(tmp)
        images, _ = composites(args.speed_images, size, seed=0, split="transfer")
        urls = write_shards(((f"t{i:05d}", Image.fromarray(im), None) for i, im in enumerate(images)),
                            work / "transfer", prefix="transfer", maxcount=max(1, len(images) // 2))
        data = "::".join(urls)
        caches = {}
        for name in [m for m in args.build_teachers.split(",") if m]:
            torch.manual_seed(0)
            teacher = create_model(name, task="segmentation", num_classes=NUM_CLASSES, image_size=size,
                                   output_stride=args.output_stride, head_width=args.head_width)
            ckpt = save_checkpoint(teacher, work / name / "checkpoint")
            caches[name] = work / f"{name}.zarr"
            summary = build_cache(BuildConfig(teacher=str(ckpt), data=data, out=str(caches[name]), views=1,
                                              targets=["seg_logits"], batch_size=batch, workers=0))
            result["build_images_per_s"][name] = round(summary["views_per_s"], 2)
        first = next(iter(caches.values()))
        start = time.perf_counter()
        summary = run_distill(DistillConfig(task="segmentation", model=args.student, output_stride=args.output_stride,
                                            cache=str(first), data=data, objective="task", image_size=size,
                                            batch_size=batch, workers=0, epochs=1, out=str(work / "distill")))
        wall = time.perf_counter() - start
        result["distill"] = {"student": args.student, "teacher_cache": next(iter(caches)), "steps": summary["steps"],
                             "steps_per_s_incl_startup": round(summary["steps"] / wall, 3)}
        from kt.checkpoints import load_checkpoint

        student = load_checkpoint(str(work / "distill" / "checkpoint")).eval()
        x = torch.randn(batch, 3, size, size)
        times = []
        with torch.inference_mode():
            for _ in range(6):
                t = time.perf_counter()
                logits = torch.nn.functional.interpolate(student(x), size=(size, size), mode="bilinear",
                                                         align_corners=False)
                logits.argmax(1)
                times.append(time.perf_counter() - t)
        result["eval_images_per_s"] = round(batch / sorted(times[1:])[len(times[1:]) // 2], 2)  # median, warm
    return result
