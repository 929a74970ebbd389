"""Segmentation models: parameters and FLOPs of each backbone at output stride 8 and of its DeepLabV3 head.

    python -m tools.bench seg-models --json
    python -m tools.bench seg-models --json --image-size 256 --models fastvit_s12,mobilevitv2_050

Each model is built by `kt.models.create_model(task="segmentation")` with random weights and moved to the
meta device, so the count costs no compute and no memory at any size: `torch.utils.flop_counter.
FlopCounterMode` counts from shapes (a multiply-add is 2 FLOPs; matmuls, convolutions and attention are
counted, elementwise ops are not). Figures are per image (batch 1), the backbone pass (embedding and grid)
and the head on the grid apart.
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
    return {"benchmark": "seg-models", "image_size": args.image_size, "output_stride": args.output_stride,
            "num_classes": args.num_classes, "head_width": args.head_width, "models": rows}
