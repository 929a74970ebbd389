"""Teacher-cache benchmark: build overhead, bytes and fidelity per codec, reader throughput.

    python -m tools.bench cache --json                  # the figures in docs/benchmarks.md
    python -m tools.bench cache --json --build-shards 1 --fidelity-views 128 --reader-samples 500   # quick

- `build_over_forward`: wall time of `build_cache` over the wall time of the same decode + render + teacher
  forward alone (`view_loader` + `teacher_outputs`, results discarded), same images, workers and process;
  run alternately `--repeats` times each, minimum taken. Teacher: ImageNet EfficientNet-Lite2 with its
  1000-class head (saved as a kt checkpoint), targets logits + embedding + patches, default codecs.
- `bytes_per_view` / `fidelity`: codecs applied to real teacher outputs on Fashion-MNIST views: Lite2
  (logits, embedding, its final feature map) and `vit_small_patch14_dinov2` patch tokens (random weights).
  PCA bases are fitted on the first half of the views and measured on the other half. Bytes are the
  encoded parts before the store's lossless compressor; `zstd_bytes_per_view` after it.
- `reader_samples_per_s`: a synthetic shard (store + codecs, no teacher) of `--reader-samples` samples
  with logits (1000 classes, topk:k=10) and patches (16x16x384, pca:d=64,int8), read and decoded by
  `CacheReader` on one process: one view per sample (a training epoch), in batches of 256.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

FMNIST = "data/fashion-mnist/train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench cache", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=FMNIST, help="Fashion-MNIST shards (a directory of .tar)")
    p.add_argument("--build-shards", type=int, default=2, help="input shards timed for build_over_forward")
    p.add_argument("--large-shards", type=int, default=0,
                   help="also time forward and build over this many shards: the per-view (marginal) ratio and the "
                        "build's fixed cost, separated (0: off)")
    p.add_argument("--image-size", type=int, default=64, help="Lite2 input size for the build timing")
    p.add_argument("--views", type=int, default=1, help="views per image in the build timing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (both sides of the ratio)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--writer-threads", type=int, default=None,
                   help="BuildConfig.writer_threads of the timed builds (default: the build's default)")
    p.add_argument("--fidelity-views", type=int, default=512, help="teacher outputs the codecs are measured on")
    p.add_argument("--fidelity-size", type=int, default=128, help="Lite2 input size for fidelity (4x4 grid)")
    p.add_argument("--grid-pca-d", default="32,64,128,256", help="PCA sizes tried on the Lite2 grid")
    p.add_argument("--dino-size", type=int, default=112, help="DINOv2 ViT-S/14 input size (8x8 tokens)")
    p.add_argument("--dino-views", type=int, default=256)
    p.add_argument("--reader-samples", type=int, default=2000, help="samples in the synthetic reader shard")
    p.add_argument("--reader-views", type=int, default=2, help="views per sample in the synthetic shard")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: build,fidelity,reader")
    p.add_argument("--workdir", default=None, help="keep stores here instead of a temporary directory")
    p.add_argument("--json", action="store_true")
    return p


def run(args=None) -> dict:
    """Run the benchmark; `args` is a Namespace, a list of command-line strings, or None."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from kt.device import keep_freed_memory

    # the build sets it for its process; set here first, so that both sides of every ratio run with it
    keep_freed_memory()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    result: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "load_avg_start": list(os.getloadavg())}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        if "build" not in skip:
            result["build"] = bench_build(args, work)
            result["build_over_forward"] = result["build"]["build_over_forward"]
            result["build_over_forward_cpu"] = result["build"]["build_over_forward_cpu"]
        if "fidelity" not in skip:
            codecs = bench_codecs(args)
            result["bytes_per_view"] = {t: {c: v["bytes_per_view"] for c, v in d.items()} for t, d in codecs.items()}
            result["zstd_bytes_per_view"] = {t: {c: v["zstd_bytes_per_view"] for c, v in d.items()}
                                             for t, d in codecs.items()}
            result["fidelity"] = {t: {c: v["fidelity"] for c, v in d.items()} for t, d in codecs.items()}
            result["goals"] = _goals(codecs)
        if "reader" not in skip:
            result["reader"] = bench_reader(args, work)
            result["reader_samples_per_s"] = {t: r["samples_per_s"] for t, r in result["reader"].items()}
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    return result


# -------------------------------------------------------------------------------------------- teacher
def lite2(image_size: int):
    from kt.models import create_model

    return create_model("tf_efficientnet_lite2", num_classes=1000, pretrained="package", image_size=image_size).eval()


# ---------------------------------------------------------------------------------------------- build
def bench_build(args, work: str) -> dict:
    import torch

    from kt.checkpoints import save_checkpoint
    from kt.shards import expand_shards
    from kt.views import ViewSet, load_view_spec
    from kt.teacher_cache.build import (
        BuildConfig,
        build_cache,
        ViewBatch,
        teacher_outputs,
        view_loader,
    )

    all_urls = expand_shards(args.data)
    urls = all_urls[: args.build_shards]
    checkpoint = str(save_checkpoint(lite2(args.image_size), os.path.join(work, "lite2")))
    targets = ["logits", "embedding", "patches"]
    model = lite2(args.image_size)
    spec = load_view_spec("train")

    def forward_only(urls=urls) -> int:
        n = 0
        for item in view_loader(urls, ViewSet(spec, 0, args.views), args.image_size, model.mean, model.std,
                                args.batch_size, args.workers):
            if isinstance(item, ViewBatch):
                with torch.inference_mode():
                    teacher_outputs(model, item.x, targets)
                n += len(item.rows)
        return n

    def build(i, urls=urls) -> dict:
        cfg = BuildConfig(teacher=checkpoint, data="::".join(urls), out=os.path.join(work, f"build{i}.zarr"),
                          views=args.views, seed=0, targets=targets, image_size=args.image_size,
                          batch_size=args.batch_size, workers=args.workers,
                          **({} if args.writer_threads is None else {"writer_threads": args.writer_threads}))
        return build_cache(cfg)

    forward_s, build_s, forward_cpu, build_cpu, clocks = [], [], [], [], []
    for i in range(args.repeats):
        (t, cpu), n_views = _timed(forward_only)
        forward_s.append(t)
        forward_cpu.append(cpu)
        (t, cpu), summary = _timed(build, i)
        build_s.append(t)
        build_cpu.append(cpu)
        clocks.append(summary["time_s"])  # where each build's loop spent its time: a slow repeat, explained
    from kt.teacher_cache.store import CacheStore

    stored = CacheStore.open(os.path.join(work, "build0.zarr")).nbytes_stored()
    large = {}
    if args.large_shards > args.build_shards:
        # build = fixed + per_view x views, forward = per_view_f x views: two sizes separate the build's fixed
        # cost (checkpoint hashing, the codecs' fit views, store creation) from what every view costs it
        big = all_urls[: args.large_shards]
        lf, lb = [], []
        for i in range(args.repeats):
            (t, _), big_views = _timed(forward_only, big)
            lf.append(t)
            (t, _), _ = _timed(build, f"large{i}", big)
            lb.append(t)
        large = {"large_views": big_views, "large_forward_s": [round(t, 2) for t in lf],
                 "large_build_s": [round(t, 2) for t in lb], "large_build_over_forward": round(min(lb) / min(lf), 3),
                 **separate_fixed_cost(n_views, min(forward_s), min(build_s), big_views, min(lf), min(lb))}
    return {**large,
        "build_over_forward": round(min(build_s) / min(forward_s), 3),
        "build_s": [round(t, 2) for t in build_s], "forward_s": [round(t, 2) for t in forward_s],
        # CPU seconds of this process and its DataLoader workers: what other agents' load does not inflate
        "build_over_forward_cpu": round(min(build_cpu) / min(forward_cpu), 3),
        "build_cpu_s": [round(t, 2) for t in build_cpu], "forward_cpu_s": [round(t, 2) for t in forward_cpu],
        "build_time_s": clocks,
        "views": n_views, "images": summary["samples"], "shards": len(urls), "image_size": args.image_size,
        "workers": args.workers, "batch_size": args.batch_size, "writer_threads": summary["writer_threads"],
        "teacher": "tf_efficientnet_lite2 (package, 1000 classes)",
        # the defaults, patches chosen by `auto` (fitted on 256 views inside the build)
        "codecs": ", ".join(f"{t} {c}" for t, c in summary.get("codecs", {}).items()),
        "stored_bytes_per_view": round(stored / max(n_views, 1), 1),
    }


def separate_fixed_cost(views: int, forward_s: float, build_s: float, large_views: int, large_forward_s: float,
                        large_build_s: float) -> dict:
    """Two sizes of the same job, each as fixed + per_view x views: the build's per-view cost over the forward's
    (`marginal_build_over_forward`) and each side's fixed cost. Timings, so on a loaded machine any of them can
    come out below zero: a figure needs a quiet machine."""
    per_view_f = (large_forward_s - forward_s) / (large_views - views)
    per_view_b = (large_build_s - build_s) / (large_views - views)
    return {"marginal_build_over_forward": round(per_view_b / per_view_f, 3),
            "build_fixed_s": round(build_s - per_view_b * views, 2),
            "forward_fixed_s": round(forward_s - per_view_f * views, 2)}


def _timed(fn, *args):
    """((wall s, CPU s of this process + its finished children), fn's result)."""
    import resource

    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    wall, used = time.perf_counter(), cpu()
    result = fn(*args)
    return (time.perf_counter() - wall, cpu() - used), result


# --------------------------------------------------------------------------------------------- codecs
LITE2_CODECS = {
    "logits": ["topk:k=10", "topk:k=5", "fp16"],
    "embedding": ["fp16", "int8", "pca:d=128,int8"],
}  # patches: fp16, int8 and pca:d=D,int8 for each --grid-pca-d
DINO_CODECS = ["fp16", "int8", "pca:d=32,int8", "pca:d=64,int8", "pca:d=128,int8"]


def teacher_views(model, urls, n_views: int, image_size: int, targets, batch_size: int = 64) -> dict:
    """Raw outputs of `model` on the first `n_views` train-spec views (one per image) of `urls`."""
    import torch

    from kt.shards import iter_samples
    from kt.views import load_view_spec, render, sample_params, to_tensor
    from kt.teacher_cache.build import teacher_outputs

    spec = load_view_spec("train")
    out: dict = {t: [] for t in targets}
    batch = []

    def flush():
        with torch.inference_mode():
            raw = teacher_outputs(model, torch.stack(batch), targets)
        for t in targets:
            out[t].append(raw[t])
        batch.clear()

    for n, sample in enumerate(iter_samples(urls), 1):
        batch.append(to_tensor(render(sample.image, sample_params(spec, 0, sample.key, 0), image_size),
                               model.mean, model.std))
        if len(batch) == batch_size:
            flush()
        if n >= n_views:
            break
    if batch:
        flush()
    return {t: np.concatenate(v) for t, v in out.items()}


def measure_codec(target: str, spec: str, raw: np.ndarray) -> dict:
    """Fit on the first half (PCA), encode/decode the second half: bytes, zstd bytes, fidelity."""
    from numcodecs import Blosc, Zstd

    from kt.errors import UserError
    from kt.teacher_cache.codecs import fidelity, parse_codec

    half = len(raw) // 2
    fit, test = raw[:half], raw[half:]
    codec = parse_codec(spec, target)
    try:
        codec.fit(fit)
    except UserError as e:  # a PCA sample too small for its d (quick runs)
        return {"bytes_per_view": codec.bytes_per_item(raw.shape[1:]), "zstd_bytes_per_view": None,
                "fidelity": {"skipped": str(e)}}
    parts = codec.encode(test)
    decoded = codec.decode(parts)
    packed = 0
    for value in parts.values():  # as the store compresses them (kt.teacher_cache.store._compressor)
        value = np.ascontiguousarray(value)
        comp = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE, typesize=value.dtype.itemsize) \
            if value.dtype.itemsize > 1 else Zstd(level=3)
        packed += len(comp.encode(value.tobytes()))
    out = {"bytes_per_view": codec.bytes_per_item(raw.shape[1:]),
           "zstd_bytes_per_view": round(packed / len(test), 1),
           "fidelity": {k: round(v, 6) for k, v in fidelity(target, test, decoded).items()}}
    if getattr(codec, "explained", None) is not None:
        out["fidelity"]["explained_variance"] = round(codec.explained, 4)
    return out


def bench_codecs(args) -> dict:
    from kt.models import create_model
    from kt.shards import expand_shards

    urls = expand_shards(args.data)
    raw = teacher_views(lite2(args.fidelity_size), urls, args.fidelity_views, args.fidelity_size,
                        ["logits", "embedding", "patches"])
    out = {}
    specs_for = dict(LITE2_CODECS, patches=["fp16", "int8"] + [f"pca:d={d},int8" for d in _ints(args.grid_pca_d)])
    for target, specs in specs_for.items():
        shape = "x".join(map(str, raw[target].shape[1:]))
        out[f"lite2_{target}"] = {f"{spec} ({shape})": measure_codec(target, spec, raw[target]) for spec in specs}
    dino = create_model("vit_small_patch14_dinov2", num_classes=0, image_size=args.dino_size).eval()
    tokens = teacher_views(dino, urls, args.dino_views, args.dino_size, ["patches"])["patches"]
    shape = "x".join(map(str, tokens.shape[1:]))
    out["dinov2_s14_random_patches"] = {f"{spec} ({shape})": measure_codec("patches", spec, tokens)
                                        for spec in DINO_CODECS}
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _goals(codecs: dict) -> dict:
    logits = next(v for k, v in codecs["lite2_logits"].items() if k.startswith("topk:k=10"))
    patches = codecs["lite2_patches"]
    fp16 = next(v for k, v in patches.items() if k.startswith("fp16"))["bytes_per_view"]
    pca = {k.split(" ")[0]: v for k, v in patches.items() if k.startswith("pca")}
    pca = {k: v for k, v in pca.items() if "cosine_mean" in v["fidelity"]}
    meets = [k for k, v in pca.items() if v["fidelity"]["cosine_mean"] >= 0.98 and fp16 / v["bytes_per_view"] >= 8]
    return {
        "topk10_logits_bytes_per_view": logits["bytes_per_view"],
        "topk10_logits_le_50_bytes": logits["bytes_per_view"] <= 50,
        "lite2_grid_pca_fp16_over_pca": {k: round(fp16 / v["bytes_per_view"], 1) for k, v in pca.items()},
        "lite2_grid_pca_cosine_mean": {k: v["fidelity"]["cosine_mean"] for k, v in pca.items()},
        "lite2_grid_pca_meeting_8x_and_cos_0.98": meets,
    }


# --------------------------------------------------------------------------------------------- reader
def synthetic_cache(url: str, n: int, views: int, seed: int = 0) -> str:
    """A one-shard cache with logits (1000 classes, topk:k=10) and patches (16x16x384, pca:d=64,int8),
    written through the store and codecs (parts generated directly: encoding 16x16x384 raw grids of a whole
    shard would need gigabytes). Returns the shard id."""
    from kt.views import load_view_spec, sample_params_batch
    from kt.teacher_cache.codecs import parse_codec
    from kt.teacher_cache.store import CacheStore

    rng = np.random.default_rng(seed)
    spec = load_view_spec("train")
    k, classes, grid, channels, d = 10, 1000, (16, 16), 384, 64
    attrs = {"teacher": {"arch": "synthetic", "weights_sha256": "0" * 64, "task": "classification",
                         "num_classes": classes, "classes": None, "image_size": 224,
                         "mean": [0.5] * 3, "std": [0.5] * 3},
             "view": {"spec": spec.to_dict(), "seed": 0, "views_per_image": views},
             "targets": {"logits": {"codec": f"topk:k={k}", "item_shape": [classes]},
                         "patches": {"codec": f"pca:d={d},int8", "item_shape": [*grid, channels]}}}
    store = CacheStore.create(url, attrs, overwrite=True)
    pca = parse_codec(f"pca:d={d},int8", "patches")
    pca.fit(rng.standard_normal((4 * d, 1, 1, channels)).astype(np.float32))
    pca.item_shape = (*grid, channels)
    store.write_codec_state("patches", *pca.state())
    keys = [f"syn-{i:06d}" for i in range(n)]
    params = sample_params_batch(spec, 0, np.repeat(keys, views).tolist(), np.tile(np.arange(views), n).tolist())
    top = -np.sort(rng.exponential(2.0, (n, views, k)), -1)[..., ::-1].copy()
    top = np.sort(top, -1)[..., ::-1]
    indices = np.argsort(rng.random((n * views, classes)), -1)[:, :k].reshape(n, views, k).astype(np.uint16)
    logits = {"values": top.astype(np.float16), "indices": indices,
              "tail": np.log(rng.uniform(0.01, 0.3, (n, views))).astype(np.float16)}
    patches = {"coeffs": rng.integers(-127, 128, (n, views, *grid, d), dtype=np.int8),
               "scale": rng.uniform(0.01, 0.1, (n, views, *grid)).astype(np.float32)}
    store.write_shard("syn-000000", "synthetic://syn-000000.tar", keys, params.reshape(n, views, -1),
                      {"logits": logits, "patches": patches}, [],
                      digests=rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64))
    return "syn-000000"


def bench_reader(args, work: str, batch: int = 256) -> dict:
    from kt.teacher_cache.reader import CacheReader

    url = os.path.join(work, "synthetic.zarr")
    shard_id = synthetic_cache(url, args.reader_samples, args.reader_views)
    out = {}
    for target in ("logits", "patches"):
        best, best_all = float("inf"), float("inf")
        for _ in range(args.repeats):
            reader = CacheReader(url, targets=[target])
            start = time.perf_counter()
            shard = reader.shard(shard_id, check_views=False)
            for i in range(0, len(shard), batch):
                shard.get(target, slice(i, i + batch), view=0)
            best = min(best, time.perf_counter() - start)
            start = time.perf_counter()
            shard = reader.shard(shard_id, check_views=False)
            for i in range(0, len(shard), batch):
                shard.get(target, slice(i, i + batch))
            best_all = min(best_all, time.perf_counter() - start)
        reader = CacheReader(url, targets=[target])
        start = time.perf_counter()
        reader.shard(shard_id, check_views=True)
        checked = time.perf_counter() - start
        item = reader.attrs["targets"][target]
        out[target] = {"samples_per_s": round(args.reader_samples / best),
                       "views_per_s_all_views": round(args.reader_samples * args.reader_views / best_all),
                       "open_with_view_check_s": round(checked, 3),
                       "codec": item["codec"], "item_shape": item["item_shape"],
                       "samples": args.reader_samples, "views_per_sample": args.reader_views, "batch": batch}
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
