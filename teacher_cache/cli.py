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
from collections.abc import Sequence

import numpy as np

from kt.config import add_config_args, build_config
from kt.errors import UserError, cli_entry, print_json_line

PROG = "kt-cache"
_SHOW = 5  # bad samples / shard ids shown before "and N more"
_KEY_BYTES = 16  # assumed UTF-8 bytes per sample key when plan has no data to measure
_VLEN_OVERHEAD = 4  # Zarr's vlen-utf8 stores a 4-byte length before each key
# verify: a cached view "differs" from re-encoding a fresh teacher output when they disagree by more than
# what numerics between batch layouts explain (1e-6 level), which can move one int8 step at most
_CONSISTENT_KL = 1e-2  # nats, logits: KL(fresh re-encoded || cached)
_CONSISTENT_COS = 0.99  # features: min cosine(fresh re-encoded, cached) over vectors


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from kt.teacher_cache.build import BuildConfig

    parser = argparse.ArgumentParser(prog=PROG, description="Build, plan, inspect and verify the teacher cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="run the teacher over the transfer set into a Zarr cache")
    add_config_args(build, BuildConfig, skip=("codec",))
    _add_codec_flag(build)

    plan = sub.add_parser("plan", help="predict bytes per sample and total size before building")
    plan.add_argument("--teacher", required=True, help="teacher checkpoint folder or model name")
    plan.add_argument("--pretrained", default="none", help="weights when --teacher is a model name")
    plan.add_argument("--image-size", type=int, default=0, help="teacher input size (0: the checkpoint's)")
    plan.add_argument("--targets", default="logits", help="comma-separated: logits,embedding,patches")
    plan.add_argument("--views", type=int, default=4, help="views per image")
    _add_codec_flag(plan)
    size = plan.add_mutually_exclusive_group(required=True)
    size.add_argument("--num-samples", type=int, help="transfer-set size")
    size.add_argument("--data", help="transfer-set shards (counted, and their keys measured)")
    plan.add_argument("--key-bytes", type=int, default=_KEY_BYTES, help="bytes per key without --data")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    info = sub.add_parser("info", help="what a cache holds, how complete it is, stored vs predicted bytes")
    info.add_argument("store", help="cache path or URL")
    info.add_argument("--json", action="store_true")

    verify = sub.add_parser("verify", help="completeness, checksums, decode, fidelity vs a fresh teacher")
    verify.add_argument("store", help="cache path or URL")
    verify.add_argument("--teacher", help="teacher checkpoint (default: the one the cache was built with)")
    verify.add_argument("--data", help="transfer-set shards (default: the input shards the cache records)")
    verify.add_argument("--samples", type=int, default=64, help="(key, view) pairs re-run through the teacher; "
                        "0 skips the fidelity check")
    verify.add_argument("--seed", type=int, default=0, help="which pairs are sampled")
    verify.add_argument("--batch-size", type=int, default=64)
    verify.add_argument("--json", action="store_true")
    return parser


def _add_codec_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--codec", dest="codec_flags", action="append", default=None, metavar="TARGET=SPEC",
                        help="codec per target, repeatable or comma-separated, e.g. logits=topk:k=10 "
                             "patches=pca:d=64,int8 (defaults: logits topk:k=10, embedding fp16, "
                             "patches pca:d=64,int8)")


def split_codec_flags(values: Sequence[str] | None) -> list[str]:
    """`--codec` values -> ["TARGET=SPEC", ...]; a comma starts a new item only before a target name."""
    from kt.teacher_cache.codecs import ITEM_NDIM

    items: list[str] = []
    for value in values or []:
        for piece in value.split(","):
            name = piece.split("=", 1)[0].strip()
            if "=" in piece and name in ITEM_NDIM or not items:
                items.append(piece.strip())
            else:
                items[-1] += "," + piece.strip()
    return [i for i in items if i]


# ------------------------------------------------------------------------------------------- build
def build_command(args: argparse.Namespace) -> int:
    from kt.teacher_cache.build import BuildConfig, build_cache

    overrides = {"codec": split_codec_flags(args.codec_flags)} if args.codec_flags else {}
    cfg = build_config(BuildConfig, args, **overrides)
    # cheap checks first: a typo in a codec should not wait for a large teacher to load
    print_json_line(build_cache(cfg))
    return 0


# -------------------------------------------------------------------------------------------- plan
def predict_size(targets: dict[str, tuple[str, Sequence[int]]], views: int, num_samples: int,
                 key_bytes: float) -> dict:
    """Bytes per sample and in total for `targets` {name: (codec spec, item shape)}, before lossless
    compression (zstd takes off more; Zarr metadata adds a few KiB). PCA's size does not depend on its fit."""
    from kt.views import PARAM_DIM
    from kt.teacher_cache.codecs import PcaCodec, parse_codec

    out: dict = {"views_per_image": views, "num_samples": num_samples, "targets": {}}
    per_sample = 0.0
    state = 0
    for name, (spec, item_shape) in targets.items():
        codec = parse_codec(spec, name)
        per_view = codec.bytes_per_item(tuple(item_shape))
        out["targets"][name] = {"codec": codec.spec, "item_shape": list(item_shape),
                                "bytes_per_view": per_view, "bytes_per_sample": per_view * views}
        per_sample += per_view * views
        if isinstance(codec, PcaCodec):
            state += int(item_shape[-1]) * (codec.d + 1) * 4  # float32 basis and mean
    out["params_bytes_per_sample"] = views * PARAM_DIM * 4
    out["key_bytes_per_sample"] = round(float(key_bytes) + _VLEN_OVERHEAD, 2)
    per_sample += out["params_bytes_per_sample"] + out["key_bytes_per_sample"]
    out["bytes_per_sample"] = round(per_sample, 2)
    out["codec_state_bytes"] = state
    out["total_bytes"] = round(per_sample * num_samples) + state
    return out


def plan_command(args: argparse.Namespace) -> int:
    from kt.teacher_cache.build import (
        item_shapes,
        load_teacher,
        check_teacher_targets,
        parse_codecs,
        parse_targets,
    )

    if args.views < 1:
        raise UserError("--views must be at least 1")
    codec_items = split_codec_flags(args.codec_flags)
    names = parse_targets(args.targets)
    codecs = parse_codecs(codec_items, names)
    key_bytes, num_samples = float(args.key_bytes), args.num_samples
    if args.data:
        num_samples, key_bytes = _count_samples(args.data)
    if num_samples is None or num_samples < 0:
        raise UserError("--num-samples must be >= 0")
    model = load_teacher(args.teacher, args.pretrained, args.image_size).eval()
    targets = names
    check_teacher_targets(targets, model)
    image_size = args.image_size or model.image_size
    shapes = item_shapes(model, targets, image_size)
    plan = predict_size({t: (codecs[t].spec, shapes[t]) for t in targets}, args.views, num_samples, key_bytes)
    plan = {"teacher": model.arch, "image_size": image_size, **plan}
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(_plan_table(plan))
    return 0


def _count_samples(data: str) -> tuple[int, float]:
    """(samples, mean UTF-8 bytes per key) of a shard spec, reading members without decoding images."""
    from kt.shards import BadSamples, expand_shards, iter_samples

    n, key_total = 0, 0
    for sample in iter_samples(expand_shards(data), bad=BadSamples(max_fraction=1.0), decode=False):
        n += 1
        key_total += len(sample.key.encode())
    return n, key_total / max(n, 1)


def _plan_table(plan: dict) -> str:
    lines = [(f"teacher {plan['teacher']} at {plan['image_size']} px, {plan['views_per_image']} views per sample, "
              f"{plan['num_samples']:,} samples"),
             f"{'target':<12}{'codec':<18}{'item shape':<16}{'bytes/view':>12}{'bytes/sample':>14}"]
    for name, t in plan["targets"].items():
        lines.append(f"{name:<12}{t['codec']:<18}{tuple(t['item_shape'])!s:<16}"
                     f"{t['bytes_per_view']:>12,}{t['bytes_per_sample']:>14,}")
    lines.append(f"{'params':<46}{'':>12}{plan['params_bytes_per_sample']:>14,}")
    lines.append(f"{'keys':<46}{'':>12}{plan['key_bytes_per_sample']:>14,.1f}")
    lines.append(f"{'per sample':<46}{'':>12}{plan['bytes_per_sample']:>14,.1f}")
    lines.append(f"predicted size {_human(plan['total_bytes'])} ({plan['total_bytes']:,} bytes, before zstd; "
                 f"codec state {_human(plan['codec_state_bytes'])})")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- info
def cache_info(url: str) -> dict:
    """Everything `kt-cache info` shows, as JSON-ready data."""
    from kt.teacher_cache.store import CacheStore

    store = CacheStore.open(url)
    attrs = store.attrs
    done = store.completed()
    expected = attrs.get("input_shards") or {}
    incomplete = sorted(set(expected) - set(done))
    partial = sorted(set(store.shards_present()) - set(done))
    samples = sum(m["n_samples"] for m in done.values())
    bad = [{"shard": sid, **b} for sid, m in sorted(done.items()) for b in m["bad"]]
    targets = {}
    for name, entry in attrs["targets"].items():
        targets[name] = {"codec": entry["codec"], "item_shape": entry.get("item_shape")}
        state = store.read_codec_state(name)
        if state is not None and state[0].get("explained_variance") is not None:
            targets[name]["explained_variance"] = state[0]["explained_variance"]
    key_bytes = _mean_key_bytes(store, done)
    views = int(attrs["view"]["views_per_image"])
    predicted = predict_size({t: (e["codec"], e["item_shape"]) for t, e in attrs["targets"].items()},
                             views, samples, key_bytes)
    stored = store.nbytes_stored()
    return {
        "url": url,
        "format": attrs.get("kt_cache_format"),
        "teacher": attrs["teacher"],
        "view": attrs["view"],
        "targets": targets,
        "shards": {"complete": len(done), "expected": len(expected) if expected else None,
                   "incomplete": incomplete, "written_without_marker": partial},
        "samples": samples,
        "bad": {"count": sum(m["n_bad"] for m in done.values()), "first": bad[:_SHOW]},
        "bytes": {"stored": stored, "predicted": predicted["total_bytes"],
                  "stored_over_predicted": round(stored / predicted["total_bytes"], 3) if predicted["total_bytes"]
                  else None, "predicted_per_sample": predicted["bytes_per_sample"],
                  "stored_per_sample": round(stored / samples, 1) if samples else None},
        "created": attrs.get("created"),
        "git_revision": attrs.get("git_revision"),
        "versions": attrs.get("versions"),
    }


def _mean_key_bytes(store, done: dict) -> float:
    if not done:
        return _KEY_BYTES
    keys = store.array(next(iter(done)), "keys")[...]
    return float(np.mean([len(str(k).encode()) for k in keys])) if len(keys) else _KEY_BYTES


def info_command(args: argparse.Namespace) -> int:
    info = cache_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    t, v, s, b = info["teacher"], info["view"], info["shards"], info["bytes"]
    spec = v["spec"]
    lines = [
        f"cache      {info['url']} (format {info['format']}, created {info['created']}, git {info['git_revision']})",
        (f"teacher    {t['arch']} ({t['task']}, {t['num_classes']} classes, {t['image_size']} px), "
         f"weights sha256 {str(t['weights_sha256'])[:16]}..."),
        (f"views      {v['views_per_image']} per image, seed {v['seed']}, spec {spec.get('kind')} "
         f"{json.dumps(spec, sort_keys=True)}"),
    ]
    for name, e in info["targets"].items():
        extra = f", explained variance {e['explained_variance']:.3f}" if "explained_variance" in e else ""
        lines.append(f"target     {name}: {e['codec']}, item shape {tuple(e['item_shape'] or ())}{extra}")
    expected = s["expected"] if s["expected"] is not None else "?"
    lines.append(f"shards     {s['complete']} / {expected} complete"
                 + (f"; incomplete: {_listing(s['incomplete'])}" if s["incomplete"] else ""))
    lines.append(f"samples    {info['samples']:,}, bad {info['bad']['count']}")
    for item in info["bad"]["first"]:
        lines.append(f"  bad      {item['shard']}/{item['key']}: {item['reason']}")
    ratio = f" ({b['stored_over_predicted']:.2f}x the plan)" if b["stored_over_predicted"] else ""
    lines.append(f"bytes      stored {_human(b['stored'])}, predicted {_human(b['predicted'])} before zstd{ratio}")
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------------ verify
def verify_cache(url: str, teacher: str | None = None, data: str | None = None, samples: int = 64,
                 seed: int = 0, batch_size: int = 64) -> dict:
    """Completeness, checksums, decode of every array and fidelity on `samples` replayed views.

    Returns {"ok", "problems": [...], "shards": {...}, "fidelity": {target: ...}, "consistency": {...}}.
    Damage goes into "problems"; bad input (a teacher of another fingerprint, missing data) raises UserError.
    """
    from kt.teacher_cache.reader import CacheReader

    reader = CacheReader(url)
    store, attrs = reader.store, reader.attrs
    problems: list[str] = []
    done = store.completed()
    expected = attrs.get("input_shards") or {}
    incomplete = sorted(set(expected) - set(done))
    if incomplete:
        problems.append(f"{len(incomplete)} of {len(expected)} input shards incomplete: {_listing(incomplete)}")
    checked = 0
    for shard_id in sorted(done):
        found = store.verify_shard(shard_id)
        problems += found
        checked += 1

    # decode every array; keep the sampled rows for the fidelity check
    rng = np.random.default_rng(seed)
    total = sum(m["n_samples"] for m in done.values())
    picks = np.sort(rng.choice(total, size=min(samples, total), replace=False)) if samples > 0 and total else []
    picked: dict[str, list[tuple[int, int]]] = {}
    offset = 0
    for shard_id in sorted(done):
        n = done[shard_id]["n_samples"]
        rows = [int(p - offset) for p in picks if offset <= p < offset + n]
        picked[shard_id] = [(r, int(rng.integers(reader.views_per_image))) for r in rows]
        offset += n
    cached: dict[str, list] = {}  # shard_id -> [(key, view, params, {target: decoded})]
    for shard_id in sorted(done):
        try:
            shard = reader.shard(shard_id, check_views=True)
            decoded = {}
            for name in reader.targets:
                for start in range(0, max(len(shard), 1), 512):
                    chunk = shard.get(name, slice(start, start + 512))
                    if not np.isfinite(chunk).all():
                        problems.append(f"{shard_id}: target {name} decodes to non-finite values")
                        break
                if picked[shard_id]:
                    decoded[name] = shard.get(name, np.array([r for r, _ in picked[shard_id]]))
            cached[shard_id] = [(shard.keys[r], v, shard.params[r, v], {t: decoded[t][i, v] for t in decoded})
                                for i, (r, v) in enumerate(picked[shard_id])]
        except UserError as e:  # ViewReplayError, a missing array
            problems.append(f"{shard_id}: {e}")
        except Exception as e:  # noqa: BLE001 -- a corrupt chunk: report and go on
            problems.append(f"{shard_id}: cannot decode ({type(e).__name__}: {e})")

    report: dict = {"url": url, "shards": {"complete": len(done), "expected": len(expected) or None,
                                           "checked": checked}, "samples_checked": 0}
    if any(cached.values()):
        fid, cons, bad_pairs = _fidelity(reader, cached, teacher, data, batch_size)
        report.update(fidelity=fid, consistency=cons, samples_checked=sum(len(v) for v in cached.values()))
        if bad_pairs:
            first = bad_pairs[0]
            problems.append(f"{len(bad_pairs)} of {report['samples_checked']} sampled views differ from a fresh "
                            f"teacher forward on the replayed view (first: {first})")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _fidelity(reader, cached: dict, teacher: str | None, data: str | None, batch_size: int):
    """Per target, codec fidelity (cached vs raw) and consistency (cached vs raw re-encoded) on replayed views."""
    import torch

    from kt.models import model_fingerprint
    from kt.shards import BadSamples, expand_shards, iter_samples
    from kt.views import render, to_tensor
    from kt.teacher_cache.build import load_teacher, teacher_outputs
    from kt.teacher_cache.codecs import fidelity
    from kt.teacher_cache.store import check_compatible, shard_id_for

    attrs = reader.attrs
    build_cfg = attrs.get("build_config") or {}
    path = teacher or build_cfg.get("teacher")
    if not path:
        raise UserError("the cache does not record its teacher; pass --teacher (or --samples 0)")
    model = load_teacher(path, build_cfg.get("pretrained", "none"), build_cfg.get("image_size", 0)).eval()
    try:
        check_compatible(attrs, {"teacher": model_fingerprint(model)})
    except UserError as e:
        raise UserError(f"teacher {path} is not the cache's teacher: {e}") from None
    if data:
        urls = {shard_id_for(u): u for u in expand_shards(data)}
    else:
        urls = dict(attrs.get("input_shards") or {})
    image_size = attrs["view"].get("image_size") or model.image_size

    pairs = []  # (key, view, params, cached targets, image)
    for shard_id, items in cached.items():
        if not items:
            continue
        if shard_id not in urls:
            raise UserError(f"no data shard for cache shard {shard_id}; pass --data with the transfer set")
        want = {key: i for i, (key, *_rest) in enumerate(items)}
        images = {}
        for sample in iter_samples([urls[shard_id]], bad=BadSamples(max_fraction=1.0)):
            if sample.key in want:
                images[sample.key] = sample.image
                if len(images) == len(want):
                    break
        missing = [k for k in want if k not in images]
        if missing:
            raise UserError(f"data shard {urls[shard_id]} lacks cached keys {_listing(missing)}; "
                            "is --data the transfer set the cache was built from?")
        pairs += [(key, v, params, dec, images[key]) for key, v, params, dec in items]

    raw_all: dict[str, list] = {t: [] for t in reader.targets}
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        x = torch.stack([to_tensor(render(img, params, image_size), model.mean, model.std)
                         for _, _, params, _, img in batch])
        with torch.inference_mode():
            out = teacher_outputs(model, x, reader.targets)
        for t in reader.targets:
            raw_all[t].append(out[t])
    fid, cons, bad_pairs = {}, {}, []
    for t in reader.targets:
        raw = np.concatenate(raw_all[t])
        dec = np.stack([p[3][t] for p in pairs])
        codec = reader.codecs[t]
        again = codec.decode(codec.encode(raw))
        fid[t] = {"codec": codec.spec, **fidelity(t, raw, dec)}
        cons[t] = fidelity(t, again, dec)
        for i, (key, v, *_rest) in enumerate(pairs):
            f = fidelity(t, again[i:i + 1], dec[i:i + 1])
            if f.get("kl_max", 0.0) > _CONSISTENT_KL or f.get("top1_agreement", 1.0) < 1.0 \
                    or f.get("cosine_min", 1.0) < _CONSISTENT_COS:
                bad_pairs.append(f"{t} of {key} view {v}: {', '.join(f'{k} {x:.4g}' for k, x in f.items())}")
    return fid, cons, bad_pairs


def verify_command(args: argparse.Namespace) -> int:
    report = verify_cache(args.store, args.teacher, args.data, args.samples, args.seed, args.batch_size)
    if args.json:
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


# ---------------------------------------------------------------------------------------- helpers
def _listing(items: Sequence[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@cli_entry(PROG)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"build": build_command, "plan": plan_command, "info": info_command,
            "verify": verify_command}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
