"""kt-student: finetune | train (distillation from the cache) | eval | export.

    kt-student finetune --model tf_efficientnet_lite2 --pretrained package --data SHARDS --out runs/teacher
    kt-student train --model mobilevitv2_050 --cache runs/cache.zarr --data SHARDS --objective task --out runs/d
    kt-student finetune --init runs/d --data SHARDS --labels-per-class 50 --out runs/student
    kt-student eval --checkpoint runs/teacher/checkpoint --data data/fashion-mnist/test
    kt-student eval --runs runs/s0 runs/s1 runs/s2
    kt-student export --checkpoint runs/student --format onnx --out student.onnx --data data/fashion-mnist/test

Multi-GPU: `accelerate launch -m kt.student.cli finetune ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

from kt.config import add_config_args, build_config, explicit_bools
from kt.errors import cli_entry, print_json_line


def build_parser() -> argparse.ArgumentParser:
    from kt.student.distill import DistillConfig
    from kt.student.evaluate import EvalConfig
    from kt.student.export import ExportConfig
    from kt.student.finetune import FinetuneConfig

    parser = argparse.ArgumentParser(prog="kt-student", description="Train and evaluate small task models.")
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="finetune any model (student or teacher) on a labeled subset")
    add_config_args(ft, FinetuneConfig)
    tr = sub.add_parser("train", help="distill a student from the teacher cache (or an online teacher)")
    add_config_args(tr, DistillConfig)
    ev = sub.add_parser("eval", help="top-1 / per-class accuracy / confusion matrix as JSON")
    add_config_args(ev, EvalConfig)
    ex = sub.add_parser("export", help="export for the device (ONNX), parity checked under onnxruntime")
    add_config_args(ex, ExportConfig)
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
    from kt.student.evaluate import EvalConfig, run_eval

    print(json.dumps(run_eval(build_config(EvalConfig, args)), indent=2))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from kt.student.export import ExportConfig, run_export

    print_json_line(run_export(build_config(ExportConfig, args)))
    return 0


@cli_entry("kt-student")
def main(argv=None) -> int:
    args = build_parser().parse_args(explicit_bools(argv))
    commands = {"finetune": finetune_command, "train": train_command, "eval": eval_command,
                "export": export_command}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
