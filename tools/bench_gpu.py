"""GPU throughput and precision: teacher images/s in the cache build, student steps/s from the cache vs with
the teacher online, and what bf16 autocast costs against fp32 on the same views.

    python -m tools.bench gpu --json                        # on a CUDA machine (about 2 minutes on an H100)
    python -m tools.bench gpu --json --device cpu --tiny    # the same code path at toy sizes on the CPU

Default sizes are the paper's: a `vit_large_patch14_dinov2` teacher (random weights, a 100-class head) at 224
px and a `fastvit_s12` student at 224 px, on seeded crops of the photographs bundled with scikit-image and
scikit-learn, written as shards in a temporary folder. Parts:

- `teacher_forward_images_per_s`: `forward_features` on a device-resident batch, bf16 autocast and fp32
  (PyTorch's default: no TF32 for matmuls), synchronised: the ceiling of the build.
- `render`: the batched GPU render (`kt.render_tensor`) of train views at the teacher's size, views/s of the
  device and the host CPU it costs per view; `render_over_forward` >= 1 means it keeps up with the teacher.
- `fidelity_bf16_vs_fp32`: the library's `teacher_outputs` in both precisions on the same rendered views:
  KL between the softmaxes, top-1 agreement, cosine of embedding and patch features. The random head is
  re-drawn so that logits have a spread like a trained classifier's (a near-uniform softmax would hide
  errors in the logits) and LayerScale is set to 1 (at timm's 1e-5 init the blocks do nothing); random
  weights make these figures indicative, not a trained teacher's.
- `build`: `kt-cache build` end to end on `build_images` 500x375 JPEGs (q95, ~44 KB: 256 distinct photos under
  distinct keys) in shards of `build_shard_images`, 2 views each, logits + embedding: decode + render in DataLoader workers, pinned copies, the
  teacher in bf16, encode, write. Views/s as the build reports it, and `steady_views_per_s` without the time
  to the first batch (worker start, first decodes, first-call set-up), which dominates a short run; the
  build's clock (`time_s`: waiting on the loader, the teacher, the writer) says which part bounds it.
  Variants: `pil_uint8` (the default: workers render with PIL, send uint8, normalised on the GPU, the
  teacher replayed as a CUDA graph), `pil_uint8_eager` (`--no-teacher-graph`), `pil_float` (workers send
  normalised float32, 4x the bytes), `cuda_render` (`--render cuda`: workers only decode),
  `pil_uint8_short` (the first `images` images only: the short run earlier rounds measured), and
  `patches_pca` / `patches_pca_host` (+ patch tokens as `pca:d=64,int8`, encoded on the GPU by default /
  by the host's writer threads with `--device-encode off`).
  `build_over_forward` < 1 means the data path or the writer, not the teacher, bounds the build.
- `distill`: student training steps/s (AdamW, bf16 autocast as `--mixed-precision bf16` gives, batches
  pinned and copied asynchronously) on the same stream from the cache and with the teacher online (bf16),
  data loading included; `online_over_cached_ideal` = 1 + teacher forward / cached step is what the cache
  saves when the data path keeps up.
- `gil_probe` (`--gil-probe`, alone): the teacher's forward alone and beside a busy Python thread (pure Python
  at two GIL switch intervals, small numpy work), eager and as the build's CUDA graph.
- `seg`: `seg_teacher` (ViT-L/14, random weights) at output stride 8 with a DeepLabV3 head at `seg_size` (512)
  px: forward images/s in bf16, and `kt-cache build --targets seg_logits` views/s (`--no-seg` skips it,
  `--seg-only` runs only it: about 30 s of GPU time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kt.views import ViewSet

PRESETS = {
    # images: enough full batches for 2 warm-up + `steps` timed steps of one epoch
    "full": dict(teacher="vit_large_patch14_dinov2", teacher_size=224, student="fastvit_s12", student_size=224,
                 images=768, build_images=4096, build_shard_images=256, views=2, batch_size=64, steps=10, rounds=2, fidelity_views=256,
                 seg_teacher="vit_large_patch14_dinov2", seg_size=512, seg_images=64, seg_batch_size=8),
    "tiny": dict(teacher="test_vit", teacher_size=32, student="test_efficientnet", student_size=32,
                 images=96, build_images=128, build_shard_images=16, views=2, batch_size=16, steps=3, rounds=1, fidelity_views=32,
                 seg_teacher="test_vit", seg_size=64, seg_images=16, seg_batch_size=4),
}

PATCH_TARGETS = ["logits", "embedding", "patches"]
BUILD_VARIANTS = {  # name: (BuildConfig overrides, uint8 views to the GPU, images: all or the first `images`)
    "pil_uint8": ({}, True, "build_images"), "pil_float": ({}, False, "build_images"),
    "pil_uint8_eager": ({"teacher_graph": False}, True, "build_images"),
    "cuda_render": ({"render": "cuda"}, True, "build_images"), "pil_uint8_short": ({}, True, "images"),
    # + ViT-L patch tokens as pca:d=64,int8: encoded on the GPU (the default) and by the host's writer threads
    "patches_pca": ({"targets": PATCH_TARGETS, "codec": ["patches=pca:d=64,int8"]}, True, "build_images"),
    "patches_pca_host": ({"targets": PATCH_TARGETS, "codec": ["patches=pca:d=64,int8"], "device_encode": "off"},
                         True, "build_images"),
    # not run by default (--build-variants): the writer in the teacher's thread, twice the workers
    "pil_uint8_writer_inline": ({"writer_threads": 0}, True, "build_images"),
    "pil_uint8_2x_workers": ({"workers": "2x"}, True, "build_images")}
DEFAULT_BUILD_VARIANTS = "pil_uint8,pil_uint8_eager,pil_float,cuda_render,pil_uint8_short,patches_pca,patches_pca_host"

SEG_CLASSES = 150  # ADE20K's
NUM_CLASSES = 100
LAYER_SCALE = 1.0  # random teachers' LayerScale (see _run)
LOGIT_STD = 3.0  # spread of the re-drawn random head's logits (a confident classifier's, not a uniform softmax)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto", help="auto (CUDA) | cuda | cuda:N | cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a dry run of the whole benchmark on the CPU")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--no-seg", action="store_true", help="skip the segmentation part (seg_teacher at stride 8)")
    p.add_argument("--seg-only", action="store_true", help="only the segmentation part")
    p.add_argument("--build-only", action="store_true", help="only the teacher's forward rate and the build part")
    p.add_argument("--gil-probe", action="store_true",
                   help="only the GIL probe: the teacher's forward alone and beside a busy Python thread")
    p.add_argument("--build-variants", default=DEFAULT_BUILD_VARIANTS,
                   help="comma-separated names of tools.bench_gpu.BUILD_VARIANTS, in order")
    for name, default in PRESETS["full"].items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None,
                       help=f"default {default} ({PRESETS['tiny'][name]} with --tiny)")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_forward(model, device, batch: int, size: int, dtype, steps: int) -> float:
    """Images/s of the teacher's forward on a batch already on the device."""
    from kt.device import Placement

    place = Placement(device, False, False, dtype)
    x = torch.randn(batch, 3, size, size, device=device)
    times = []
    with torch.inference_mode(), place.teacher_autocast():
        for i in range(steps + 2):
            _sync(device)
            start = time.perf_counter()
            model.forward_features(x)
            _sync(device)
            if i >= 2:  # warm-up: kernel selection, allocator
                times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def fidelity(model, urls, spec, size: int, n_views: int, batch: int, device) -> dict:
    """bf16 autocast vs fp32 through `teacher_outputs`, on the first `n_views` rendered views of the data."""
    from kt.device import Placement
    from kt.teacher_cache.build import ShardViewBatches, ViewBatch, teacher_outputs

    fp32, bf16 = (Placement(device, False, False, d) for d in (None, torch.bfloat16))
    targets = ["logits", "embedding", "patches"]
    got = {"fp32": {t: [] for t in targets}, "bf16": {t: [] for t in targets}}
    n = 0
    for item in ShardViewBatches(urls, ViewSet(spec, 0, 1), size, model.mean, model.std, batch):
        if not isinstance(item, ViewBatch):
            continue
        with torch.inference_mode():
            for name, place in (("fp32", fp32), ("bf16", bf16)):
                out = teacher_outputs(model, item.x, targets, place)
                for t in targets:
                    got[name][t].append(out[t])
        n += len(item.rows)
        if n >= n_views:
            break
    a = {t: np.concatenate(v)[:n_views] for t, v in got["fp32"].items()}
    b = {t: np.concatenate(v)[:n_views] for t, v in got["bf16"].items()}
    p = torch.log_softmax(torch.from_numpy(a["logits"]).double(), -1)
    q = torch.log_softmax(torch.from_numpy(b["logits"]).double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).numpy()

    def cos(x, y):
        x, y = x.reshape(-1, x.shape[-1]).astype(np.float64), y.reshape(-1, y.shape[-1]).astype(np.float64)
        return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)

    ce, cp = cos(a["embedding"], b["embedding"]), cos(a["patches"], b["patches"])
    return {"views": int(len(kl)), "logits_std": float(a["logits"].std()), "logits_kl_mean": float(kl.mean()),
            "logits_kl_max": float(kl.max()),
            "top1_agreement": float((a["logits"].argmax(1) == b["logits"].argmax(1)).mean()),
            "embedding_cos_mean": float(ce.mean()), "embedding_cos_min": float(ce.min()),
            "patches_cos_mean": float(cp.mean()), "patches_cos_min": float(cp.min())}


def distill_steps(cfg: dict, cache: Path, urls, teacher, device, workers: int) -> dict:
    """Median step time of the student from the cache (views rendered by the PIL workers, and by
    `--render cuda`: the workers only decode, `render_sources` renders each batch on the device: what
    `kt-student train --render auto` should pick is the faster) and with the teacher online, in alternating
    rounds."""
    from kt.device import placement
    from kt.models import create_model
    from kt.student.dataset import CacheSource
    from kt.student.distill import Distiller, FreshSource
    from kt.student.losses import create_objective
    from kt.student.stream import ReplayStream, StreamSpec, render_sources, stream_loader
    from kt.teacher_cache.reader import CacheReader

    place, place_teacher = placement(device), placement(device, "bf16")
    reader = CacheReader(str(cache), targets=["logits"])
    shards = [reader.shard(u, []) for u in urls]
    spec = StreamSpec(tuple(urls), tuple(len(s.keys) for s in shards), cfg["batch_size"], seed=0, workers=workers)
    torch.manual_seed(0)
    student = create_model(cfg["student"], num_classes=NUM_CLASSES, image_size=cfg["student_size"]).to(device)
    objective = create_objective("task", {"num_classes": NUM_CLASSES, "embedding": student.embedding_dim,
                                          "grid": student.grid_dim}, {"num_classes": NUM_CLASSES}).to(device)
    cached, online = Distiller(student, objective), Distiller(student, objective, teacher, "bf16")
    opt = torch.optim.AdamW(cached.parameters(), lr=1e-4)
    keys = {u: s.keys for u, s in zip(urls, shards)}

    def loader(mode: str):
        common = dict(view_set=reader.view_set, policy="cycle", image_size=cfg["student_size"], mean=student.mean, std=student.std)
        if mode in ("cached", "cached_render"):
            stream = ReplayStream(spec, 0, 0, CacheSource(reader, ["logits"]), device_render=mode == "cached_render",
                                  **common)
        else:
            stream = ReplayStream(spec, 0, 0, FreshSource(keys), teacher_size=teacher.image_size,
                                  teacher_norm=(teacher.mean, teacher.std), **common)
        return stream_loader(stream, pin_memory=place.pin_memory)

    def timed(mode: str, model) -> list[float]:
        times, it = [], iter(loader(mode))
        for i in range(cfg["steps"] + 2):
            start = time.perf_counter()
            batch = next(it)
            if mode == "cached_render":
                batch = render_sources(batch, device, cfg["student_size"], student.mean, student.std)
            batch = place.to(batch)
            with torch.autocast(device.type, dtype=torch.bfloat16):  # what --mixed-precision bf16 does
                loss, _ = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return times

    steps_needed = cfg["steps"] + 2
    available = sum(spec.sizes) // cfg["batch_size"]
    if available < steps_needed:
        raise SystemExit(f"bench gpu: {available} batches in the data, {steps_needed} needed; raise --images")
    student.train()
    c, o, r = [], [], []
    for _ in range(cfg["rounds"]):
        c += timed("cached", cached)
        r += timed("cached_render", cached)
        o += timed("online", online)
    fwd = statistics.median(_teacher_step_times(teacher, device, cfg, 5))
    cm, om, rm = statistics.median(c), statistics.median(o), statistics.median(r)
    return {"cached_steps_per_s": 1 / cm, "online_steps_per_s": 1 / om, "cached_speedup": om / cm,
            # > 1: rendering on the device trains faster than the PIL workers (`--render auto` should pick it)
            "cached_render_steps_per_s": 1 / rm, "device_render_speedup": cm / rm,
            "online_over_cached_ideal": 1 + fwd / cm, "teacher_forward_s_per_batch": fwd,
            "batch_size": cfg["batch_size"], "student_precision": "bf16 autocast",
            "teacher_precision": str(place_teacher.teacher_dtype or torch.float32).removeprefix("torch."),
            "timed_steps_per_mode": len(c)}


def _teacher_step_times(teacher, device, cfg, steps) -> list[float]:
    from kt.device import placement

    place = placement(device, "bf16")
    x = torch.randn(cfg["batch_size"], 3, teacher.image_size, teacher.image_size, device=device)
    out = []
    with torch.inference_mode(), place.teacher_autocast():
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            teacher.forward_features(x)
            _sync(device)
            out.append(time.perf_counter() - start)
    return out


def render_rate(device: torch.device, batch: int, size: int, forward_per_s: float) -> dict:
    """The batched GPU render (`kt.render_tensor.render_batch`, train views of 500x375 JPEGs decoded by nvJPEG)
    at the teacher's size, views/s of the device; `render_over_forward` >= 1: it keeps up with the teacher in
    bf16, the measurement `--render auto` waits for (kt.render_tensor.render_device_for)."""
    from tools.bench_pipeline import bench_render_gpu

    row = bench_render_gpu(None, batch=batch, device=str(device), formats=("JPEG",), specs=("train",),
                           sizes=(size,))[f"train_{size}px_jpeg"]
    return {**row, "size": size, "render_over_forward": row["render_views_per_s"] / forward_per_s}


def run(args) -> dict:
    from kt.device import resolve_device
    from kt.errors import UserError

    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v)
           for k, v in PRESETS["tiny" if args.tiny else "full"].items()}
    try:
        device = resolve_device(args.device)
        if device.type != "cuda" and not args.tiny:
            raise UserError("no CUDA device here; `--device cpu --tiny` runs the same path at toy sizes")
    except UserError as e:
        print(f"bench gpu: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    started = time.perf_counter()
    if args.gil_probe:
        return {"gil_probe": gil_probe(cfg, device), "seconds": time.perf_counter() - started}
    with tempfile.TemporaryDirectory() as tmp:
        out = {} if args.seg_only else _run(cfg, device, args.workers, Path(tmp), args.build_only,
                                                  args.build_variants)
        if not args.no_seg and not args.build_only:
            t = time.perf_counter()
            out["seg"] = seg_speed(cfg, device, args.workers, Path(tmp))
            out["seg"]["seconds"] = time.perf_counter() - t
    out["seconds"] = time.perf_counter() - started
    return out


def _run(cfg: dict, device: torch.device, workers: int, tmp: Path, build_only: bool = False,
         build_variants_arg: str = DEFAULT_BUILD_VARIANTS) -> dict:
    from kt.checkpoints import save_checkpoint
    from kt.models import create_model
    from kt.views import load_view_spec

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
              "tf32_cudnn": torch.backends.cudnn.allow_tf32, "workers": workers, **cfg}
    t = time.perf_counter()
    # shards of 256 images, 2 per worker: shards of one batch (64 images), as earlier rounds used, made the
    # writer's fixed cost per shard (~50 ms of zarr metadata, `bench pipeline`'s shard_fixed_ms) the limit
    urls = jpeg_shards(tmp / "jpegs", cfg["build_images"], shard_size=cfg["build_shard_images"])
    result["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.device(device):  # random init on the device: seconds instead of a minute for ViT-L on a CPU
        torch.manual_seed(0)
        teacher = create_model(cfg["teacher"], num_classes=NUM_CLASSES, image_size=cfg["teacher_size"]).eval()
    with torch.no_grad():
        # timm starts DINOv2's LayerScale at 1e-5, which makes a random ViT nearly the identity (its embedding is
        # the same for every image, so bf16 would look free); at 1 every block computes, as a trained one does
        for name, p in teacher.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(LAYER_SCALE)
        x = torch.randn(cfg["batch_size"], 3, cfg["teacher_size"], cfg["teacher_size"], device=device)
        emb = teacher.forward_features(x)["embedding"]
        teacher.head.weight.normal_(0, LOGIT_STD / float(emb.norm(dim=1).mean()))
    result["teacher_create_s"] = time.perf_counter() - t

    rates = {name: teacher_forward(teacher, device, cfg["batch_size"], cfg["teacher_size"], dtype, cfg["steps"])
             for name, dtype in (("bf16", torch.bfloat16), ("fp32", None))}
    result["teacher_forward_images_per_s"] = rates
    result["teacher_bf16_speedup"] = rates["bf16"] / rates["fp32"]
    if not build_only:
        result["render"] = render_rate(device, cfg["batch_size"], cfg["teacher_size"], rates["bf16"])
        result["fidelity_bf16_vs_fp32"] = fidelity(teacher, urls, load_view_spec("train"), cfg["teacher_size"],
                                                   cfg["fidelity_views"], cfg["batch_size"], device)

    t = time.perf_counter()
    ckpt = save_checkpoint(teacher.float().cpu(), tmp / "teacher", classes=[f"c{i}" for i in range(NUM_CLASSES)])
    teacher.to(device)
    result["checkpoint_s"] = time.perf_counter() - t
    bf16 = device.type == "cuda"  # CPU builds run fp32 (kt.device)
    result["build"] = build_variants(cfg, ckpt, urls, tmp, workers, rates["bf16" if bf16 else "fp32"],
                                     build_variants_arg)
    if not build_only:
        result["distill"] = distill_steps(cfg, tmp / "build" / "pil_uint8.zarr", urls, teacher, device, workers)
    return result


def gil_probe(cfg: dict, device: torch.device, batches: int = 12) -> dict:
    """The teacher's forward (images/s, synchronised per batch as the build does, and host ms to launch it)
    alone and beside a busy Python thread: a pure-Python loop at the default 5 ms GIL switch interval and at
    0.5 ms, and small numpy work (which releases the GIL); eagerly and, on CUDA, as the build's CUDA graph
    (`GraphedTeacher`). What made the build's eager teacher run at half its rate (docs/benchmarks.md)."""
    import threading

    import numpy as np

    from kt.device import placement
    from kt.models import create_model
    from kt.teacher_cache.build import GraphedTeacher, teacher_targets

    size, batch = cfg["teacher_size"], cfg["batch_size"]
    with torch.device(device):
        torch.manual_seed(0)
        model = create_model(cfg["teacher"], num_classes=NUM_CLASSES, image_size=size).eval()
    place = placement(device)
    x = torch.randn(batch, 3, size, size, device=device)
    runs = {"eager": lambda: teacher_targets(model, x, ["logits", "embedding"])}
    if device.type == "cuda":
        graphed = GraphedTeacher(model, ["logits", "embedding"], place, batch, size)
        runs["graph"] = lambda: graphed(x)

    def rate(fn) -> dict:
        with torch.inference_mode(), place.teacher_autocast():
            for _ in range(2):
                fn()
            _sync(device)
            start, launch = time.perf_counter(), 0.0
            for _ in range(batches):
                t = time.perf_counter()
                out = fn()
                launch += time.perf_counter() - t
                out["logits"].float().cpu()  # the build waits for each batch's outputs
            elapsed = time.perf_counter() - start
        return {"images_per_s": round(batch * batches / elapsed, 1), "launch_ms_per_batch": round(1000 * launch / batches, 2)}

    loads = {"python_loop": lambda: sum(range(2000)),
             "numpy_small": lambda: np.random.rand(64, 100).argsort(1)}
    out = {"teacher": cfg["teacher"], "batch_size": batch, "image_size": size}
    switch = sys.getswitchinterval()
    try:
        for mode, fn in runs.items():
            out[mode] = {"alone": rate(fn)}
            for load, work in loads.items():
                for interval in (0.005, 0.0005):
                    sys.setswitchinterval(interval)
                    stop = threading.Event()

                    def busy(work=work, stop=stop):
                        while not stop.is_set():
                            work()

                    thread = threading.Thread(target=busy, daemon=True)
                    thread.start()
                    try:
                        out[mode][f"beside_{load}_switch_{interval * 1000:g}ms"] = rate(fn)
                    finally:
                        stop.set()
                        thread.join()
    finally:
        sys.setswitchinterval(switch)
    return out


def jpeg_shards(out: Path, n: int, shard_size: int, distinct: int = 256) -> list[str]:
    """`n` 500x375 JPEGs (q95, ~44 KB, `tools.bench_pipeline`'s photos) in shards of `shard_size`: `distinct`
    photos encoded once and repeated under distinct keys, so that making the data takes seconds, not minutes."""
    from kt.shards import write_shards
    from tools.bench_pipeline import encode, photos_500x375

    jpegs = [encode(img, "JPEG") for img in photos_500x375(min(n, distinct), seed=1)]
    samples = ({"__key__": f"photo-{i:06d}", "jpg": jpegs[i % len(jpegs)], "cls": b"0"} for i in range(n))
    return write_shards(samples, out, prefix="photos", maxcount=shard_size)


def build_variants(cfg: dict, ckpt, urls: list[str], tmp: Path, workers: int, forward_per_s: float,
                   variants: str = DEFAULT_BUILD_VARIANTS) -> dict:
    """`kt-cache build` of the JPEG transfer set (shards of `build_shard_images`) in each of BUILD_VARIANTS
    (without CUDA only `pil_uint8` and `patches_pca_host`)."""
    import kt.render as render
    import kt.teacher_cache.build as build

    out = {"input": "500x375 JPEG q95", "views_per_image": cfg["views"], "targets": ["logits", "embedding"],
           "workers": workers}  # targets: unless a variant says otherwise
    # without CUDA (a dry run at toy sizes): the default and the host-encoded patches, the variants a CPU can run
    names = [n for n in variants.split(",") if torch.cuda.is_available() or n in ("pil_uint8", "patches_pca_host")]
    for name in names:
        overrides, uint8, images = BUILD_VARIANTS[name]
        mine = urls[:max(1, cfg[images] // cfg["build_shard_images"])]
        kw = {"workers": workers, "targets": ["logits", "embedding"]} | overrides
        kw["workers"] = 2 * workers if kw["workers"] == "2x" else kw["workers"]
        render.UINT8_VIEWS = "cuda" if uint8 else "never"
        try:
            summary = build.build_cache(build.BuildConfig(
                teacher=str(ckpt), data="::".join(mine), out=str(tmp / "build" / f"{name}.zarr"), views=cfg["views"],
                batch_size=cfg["batch_size"], **kw))
        finally:
            render.UINT8_VIEWS = "cuda"
        out[name] = {"views": summary["samples"] * cfg["views"], "views_per_s": summary["views_per_s"],
                     "steady_views_per_s": summary["steady_views_per_s"], "time_s": summary["time_s"],
                     "build_over_forward": summary["views_per_s"] / forward_per_s,
                     "steady_over_forward": summary["steady_views_per_s"] / forward_per_s,
                     "workers": kw["workers"], "writer_threads": summary["writer_threads"],
                     "teacher_graph": summary["teacher_graph"], "targets": kw["targets"],
                     "steady_views_per_s_per_worker": summary["steady_views_per_s"] / max(kw["workers"], 1),
                     "device": summary["device"], "teacher_dtype": summary["teacher_dtype"]}
    return out


def seg_speed(cfg: dict, device: torch.device, workers: int, tmp: Path) -> dict:
    """`seg_teacher` (random weights) at output stride 8 with a DeepLabV3 head: forward images/s in bf16 autocast
    at `seg_size` px, and `kt-cache build --targets seg_logits` (one view per image, default codec) views/s."""
    from kt.checkpoints import save_checkpoint
    from kt.models import create_model
    from kt.teacher_cache.build import BuildConfig, build_cache
    from tools.make_shards import make_photo_crops

    size, batch = cfg["seg_size"], cfg["seg_batch_size"]
    with torch.device(device):
        torch.manual_seed(0)
        model = create_model(cfg["seg_teacher"], task="segmentation", num_classes=SEG_CLASSES, image_size=size,
                             output_stride=8).eval()
    out = {"teacher": cfg["seg_teacher"], "image_size": size, "output_stride": 8, "batch_size": batch,
           "grid": list(model.grid_size(size)),
           "forward_images_per_s_bf16": teacher_forward(model, device, batch, size, torch.bfloat16, cfg["steps"])}
    urls = make_photo_crops(tmp / "seg_photos", cfg["seg_images"], size=int(size * 8 / 7), seed=1, shard_size=batch)
    ckpt = save_checkpoint(model.float().cpu(), tmp / "seg_teacher")
    del model
    summary = build_cache(BuildConfig(teacher=str(ckpt), data="::".join(urls), out=str(tmp / "seg.zarr"), views=1,
                                      targets=["seg_logits"], batch_size=batch, workers=workers))
    out["build"] = {"views": summary["samples"], "views_per_s": summary["views_per_s"],
                    "codec": summary["codecs"]["seg_logits"], "teacher_dtype": summary["teacher_dtype"]}
    out["build_over_forward"] = summary["views_per_s"] / out["forward_images_per_s_bf16"]
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(build_parser().parse_args()), indent=2))
    sys.exit(0)
