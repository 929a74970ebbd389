"""kt-student: finetune | train (distillation from the cache) | eval.

    kt-student finetune --model tf_efficientnet_lite2 --pretrained package --data SHARDS --out runs/teacher
    kt-student train --model mobilevitv2_050 --cache runs/cache.zarr --data SHARDS --objective task --out runs/d
    kt-student finetune --init runs/d --data SHARDS --labels-per-class 50 --out runs/student
    kt-student eval --checkpoint runs/teacher/checkpoint --data data/fashion-mnist/test
    kt-student eval --runs runs/s0 runs/s1 runs/s2

Multi-GPU: `accelerate launch -m kt.student.cli finetune ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

from kt.config import add_config_args, build_config
from kt.errors import UserError, cli_entry, print_json_line


def build_parser() -> argparse.ArgumentParser:
    from kt.student.distill import DistillConfig
    from kt.student.finetune import FinetuneConfig

    parser = argparse.ArgumentParser(prog="kt-student", description="Train and evaluate small task models.")
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="finetune any model (student or teacher) on a labeled subset")
    add_config_args(ft, FinetuneConfig)
    tr = sub.add_parser("train", help="distill a student from the teacher cache (or an online teacher)")
    add_config_args(tr, DistillConfig)
    ev = sub.add_parser("eval", help="top-1 / per-class accuracy / confusion matrix as JSON")
    ev.add_argument("--checkpoint", help="checkpoint folder (a run folder works too)")
    ev.add_argument("--data", help="evaluation shards")
    ev.add_argument("--runs", nargs="+", help="run folders to aggregate (mean ± std of their eval.json)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--workers", type=int, default=2)
    return parser


def finetune_command(args: argparse.Namespace) -> int:
    from kt.student.finetune import FinetuneConfig, run_finetune

    print_json_line(run_finetune(build_config(FinetuneConfig, args)))
    return 0


def train_command(args: argparse.Namespace) -> int:
    from kt.student.distill import DistillConfig, run_distill

    print_json_line(run_distill(build_config(DistillConfig, args)))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kt.student.evaluate import aggregate, evaluate, load_run_metrics

    if args.runs:
        print(json.dumps(aggregate([load_run_metrics(r) for r in args.runs]), indent=2))
        return 0
    if not args.checkpoint or not args.data:
        raise UserError("eval needs --checkpoint and --data, or --runs")
    from kt.models import load_checkpoint
    from kt.shards import expand_shards

    ckpt = Path(args.checkpoint)
    if (ckpt / "checkpoint").is_dir():
        ckpt = ckpt / "checkpoint"
    urls = expand_shards(args.data)
    model = load_checkpoint(ckpt)
    print(json.dumps(evaluate(model, urls, args.batch_size, args.workers, classes=getattr(model, "classes", None)),
                     indent=2))
    return 0


@cli_entry("kt-student")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"finetune": finetune_command, "train": train_command, "eval": eval_command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
