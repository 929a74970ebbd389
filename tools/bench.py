"""Benchmarks, one entry point: `python -m tools.bench NAME [--json]` (NAME: cache, distill, retrieval, export, gpu,
seg-models, seg-codecs, pipeline, finetune, channels-last, s3).

    python -m tools.bench cache --json          # teacher cache: build overhead, bytes, fidelity, reader
    python -m tools.bench distill --json        # student distillation from the cache
    python -m tools.bench retrieval             # curate time / memory, IVF-PQ recall
    python -m tools.bench export --json         # device students: latency per image, onnxruntime vs torch
    python -m tools.bench gpu --json            # GPU: teacher images/s, build, student steps/s, bf16 fidelity
    python -m tools.bench seg-models --json     # segmentation: params, FLOPs, build / distill / eval speed
    python -m tools.bench seg-codecs --json     # segmentation: seg_logits bytes per view and fidelity per codec
    python -m tools.bench pipeline --json       # data path: render views/s per core, writer, build + stream ceilings
    python -m tools.bench finetune --json       # small labeled sets: an epoch's cost beyond its steps
    python -m tools.bench channels-last --json  # NCHW vs channels_last weights: train / inference images/s
    python -m tools.bench s3 --json             # a student step reading cache and shards from s3://: requests, bytes

Each benchmark lives in `tools/bench_<name>.py` with `build_parser()` and `run(args)`; it is imported only
when asked for, so one benchmark's heavy imports never slow another. Results are recorded with their
command in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib
import json
import sys

BENCHMARKS = {
    "cache": "tools.bench_cache",
    "distill": "tools.bench_distill",
    "retrieval": "tools.bench_retrieval",
    "export": "tools.bench_export",
    "gpu": "tools.bench_gpu",
    "seg-models": "tools.bench_seg_models",
    "seg-codecs": "tools.bench_seg_codecs",
    "pipeline": "tools.bench_pipeline",
    "finetune": "tools.bench_finetune",
    "channels-last": "tools.bench_channels_last",
    "s3": "tools.bench_s3",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        print(f"usage: python -m tools.bench {{{','.join(BENCHMARKS)}}} [--json] [options]\n{__doc__}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(BENCHMARKS[name])
    args = _parse(module, rest)
    result = module.run(args)  # every benchmark returns one dict; printing is done here, once
    print(json.dumps(result, indent=None if getattr(args, "json", False) else 2))
    return 0


def _parse(module, rest: list[str]):
    """The module's own parser, when it has one; `--json` is accepted by every benchmark."""
    if not hasattr(module, "build_parser"):
        return rest
    parser = module.build_parser()
    if not any(a.dest == "json" for a in parser._actions):
        parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(rest)


if __name__ == "__main__":
    sys.exit(main())
