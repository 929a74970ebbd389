"""kt-cache: build | plan | info | verify the teacher cache.

    kt-cache plan  --teacher runs/teacher/checkpoint --targets logits,patches --views 4 --data 'data/fmnist/train'
    kt-cache build --teacher runs/teacher/checkpoint --data 'data/fmnist/train' --out runs/cache.zarr \
        --views 4 --seed 0 --targets logits,patches --codec logits=topk:k=10 --codec patches=pca:d=64,int8
    kt-cache info  runs/cache.zarr [--json]
    kt-cache verify runs/cache.zarr [--teacher CKPT] [--data SHARDS] [--samples 64] [--json]

Multi-process: `accelerate launch [--num_processes N] -m kt.teacher_cache.cli build ...` on GPUs, and
`torchrun --standalone --nproc_per_node N -m kt.teacher_cache.cli build ...` on CPUs (gloo; accelerate launch
--cpu starts one process unless it has an MPI hostfile). Ranks take disjoint input shards.

`--codec` may be repeated or comma-separated (`--codec logits=topk:k=10,patches=pca:d=64,int8`): a comma
starts a new TARGET=SPEC only where a target name follows it, so PCA's `,int8` stays in its spec.

Exit status: 0 done / clean; 1 `verify` found damage (the problems are listed); 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import sys

from kt.config import add_config_args, build_config, explicit_bools
from kt.errors import cli_entry, print_json_line
from kt.teacher_cache.codecs import split_codec_flags
from kt.teacher_cache.inspection import (
    InfoConfig,
    PlanConfig,
    VerifyConfig,
    cache_info,
    listing,
    plan_cache,
    verify_cache,
)

PROG = "kt-cache"


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from kt.teacher_cache.build import BuildConfig

    parser = argparse.ArgumentParser(prog=PROG, description="Build, plan, inspect and verify the teacher cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="run the teacher over the transfer set into a Zarr cache")
    add_config_args(build, BuildConfig, skip=("codec",))
    _add_codec_flag(build)
    plan = sub.add_parser("plan", help="predict bytes per sample and total size before building")
    add_config_args(plan, PlanConfig, skip=("codec",))
    _add_codec_flag(plan)
    info = sub.add_parser("info", help="what a cache holds, how complete it is, stored vs predicted bytes")
    add_config_args(info, InfoConfig)
    verify = sub.add_parser("verify", help="completeness, checksums, decode, fidelity vs a fresh teacher")
    add_config_args(verify, VerifyConfig)
    return parser


def _add_codec_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--codec", dest="codec_flags", action="append", default=None, metavar="TARGET=SPEC",
                        help="codec per target, repeatable or comma-separated, e.g. logits=topk:k=10 "
                             "patches=pca:d=64,int8 (defaults: logits topk:k=10, embedding fp16, "
                             "patches auto:cos=0.98: the smallest PCA whose held-out cosine reaches 0.98, else int8)")


def _codec_overrides(args: argparse.Namespace) -> dict:
    return {"codec": split_codec_flags(args.codec_flags)} if args.codec_flags else {}


# ------------------------------------------------------------------------------------------ commands
def build_command(args: argparse.Namespace) -> int:
    from kt.teacher_cache.build import BuildConfig, build_cache

    print_json_line(build_cache(build_config(BuildConfig, args, **_codec_overrides(args))))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    cfg = build_config(PlanConfig, args, **_codec_overrides(args))
    plan = plan_cache(cfg)
    print(json.dumps(plan, indent=2) if cfg.json else _plan_table(plan))
    return 0


def _plan_table(plan: dict) -> str:
    lines = [(f"teacher {plan['teacher']} at {plan['image_size']} px, {plan['views_per_image']} views per sample, "
              f"{plan['num_samples']:,} samples"),
             f"{'target':<12}{'codec':<18}{'item shape':<16}{'bytes/view':>12}{'bytes/sample':>14}"]
    for name, t in plan["targets"].items():
        at_most = "<= " if t.get("at_most") else ""  # auto: its int8 fallback until the build chooses
        per_view, per_sample = (at_most + format(t[k], ",") for k in ("bytes_per_view", "bytes_per_sample"))
        lines.append(f"{name:<12}{t['codec']:<18}{tuple(t['item_shape'])!s:<16}{per_view:>12}{per_sample:>14}")
    lines.append(f"{'params':<46}{'':>12}{plan['params_bytes_per_sample']:>14,}")
    lines.append(f"{'keys':<46}{'':>12}{plan['key_bytes_per_sample']:>14,.1f}")
    lines.append(f"{'content digests':<46}{'':>12}{plan['digest_bytes_per_sample']:>14,}")
    lines.append(f"{'per sample':<46}{'':>12}{plan['bytes_per_sample']:>14,.1f}")
    lines.append(f"predicted size {'at most ' if plan.get('at_most') else ''}{_human(plan['total_bytes'])} "
                 f"({plan['total_bytes']:,} bytes, before zstd; "
                 f"codec state {_human(plan['codec_state_bytes'])})")
    q = plan.get("teacher_on_views")
    if q:
        e = q["eval"]
        lines.append(f"teacher on views of {e['views']} labeled images: eval view top-1 {e['top1']:.3f}, "
                     f"confidence {e['confidence']:.3f}")
        for name, r in q.items():
            if name != "eval":
                lines.append(f"  {name[:40]:<40} top-1 {r['top1']:.3f}  agrees with eval view {r['agree_eval']:.3f}  "
                             f"confidence {r['confidence']:.3f}  ({r['views']} views)")
    d = plan.get("data_path")
    if d:
        lines.append(f"data path ({d['views']} {d['view_spec']} views at {d['image_size']} px of {d['median_source']} "
                     f"sources, {d['views_per_image']} per image, one core): {d['cpu_ms_per_view']} CPU ms a view, "
                     f"{d['views_per_s_per_core']:,} views/s per core; DataLoader cores per 1,000 teacher views/s: "
                     f"{d['cores_per_1000_views_per_s']}")
    return "\n".join(lines)


def info_command(args: argparse.Namespace) -> int:
    cfg = build_config(InfoConfig, args)
    info = cache_info(cfg.store)
    if cfg.json:
        print(json.dumps(info, indent=2))
        return 0
    t, v, s, b = info["teacher"], info["view"], info["shards"], info["bytes"]
    spec = v["spec"]
    lines = [
        f"cache      {info['url']} (format {info['format']}, created {info['created']}, git {info['git_revision']})",
        (f"teacher    {t['arch']} ({t['task']}, {t['num_classes']} classes, {t['image_size']} px), "
         f"weights sha256 {str(t['weights_sha256'])[:16]}..."
         + (f", output stride {t['output_stride']}" if t.get("output_stride") else "")),
        (f"views      {v['views_per_image']} per image, seed {v['seed']}, spec {spec.get('kind')} "
         f"{json.dumps(spec, sort_keys=True)}"),
    ]
    for name, e in info["targets"].items():
        extra = f", explained variance {e['explained_variance']:.3f}" if "explained_variance" in e else ""
        codec = e["codec"]
        if "chosen" in e:
            fid = e["selection"]["fidelity"]
            codec += (f" -> {e['chosen']} (held-out cosine mean {fid['cosine_mean']:.4f}, "
                      f"min {fid['cosine_min']:.4f})")
        lines.append(f"target     {name}: {codec}, item shape {tuple(e['item_shape'] or ())}{extra}")
    expected = s["expected"] if s["expected"] is not None else "?"
    lines.append(f"shards     {s['complete']} / {expected} complete"
                 + (f"; incomplete: {listing(s['incomplete'])}" if s["incomplete"] else ""))
    lines.append(f"samples    {info['samples']:,}, bad {info['bad']['count']}")
    for item in info["bad"]["first"]:
        lines.append(f"  bad      {item['shard']}/{item['key']}: {item['reason']}")
    ratio = f" ({b['stored_over_predicted']:.2f}x the plan)" if b["stored_over_predicted"] else ""
    lines.append(f"bytes      stored {_human(b['stored'])}, predicted {_human(b['predicted'])} before zstd{ratio}")
    print("\n".join(lines))
    return 0


def verify_command(args: argparse.Namespace) -> int:
    cfg = build_config(VerifyConfig, args)
    report = verify_cache(cfg.store, cfg.teacher or None, cfg.data or None, cfg.samples, cfg.seed, cfg.batch_size)
    if cfg.json:
        print(json.dumps(report, indent=2))
    else:
        s = report["shards"]
        print(f"{report['url']}: {s['complete']} / {s['expected'] or '?'} shards complete, {s['checked']} checked "
              f"(checksums, decode), {report['samples_checked']} views re-run through the teacher")
        for t, f in report.get("fidelity", {}).items():
            print(f"  {t} ({f['codec']}): " + ", ".join(f"{k} {v:.4g}" for k, v in f.items() if k != "codec"))
        for p in report["problems"]:
            print(f"  problem: {p}")
        print("ok" if report["ok"] else f"damaged: {len(report['problems'])} problem(s)")
    return 0 if report["ok"] else 1


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@cli_entry(PROG)
def main(argv=None) -> int:
    args = build_parser().parse_args(explicit_bools(argv))
    return {"build": build_command, "plan": plan_command, "info": info_command,
            "verify": verify_command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
