"""Distillation speed: what the cache costs over plain supervised training, and what it saves over an
online teacher.

    python -m tools.bench distill --json

- `cached_over_supervised`: a student step distilling from the cache (stored views replayed, targets
  decoded, KL) over a plain supervised step of the same student on the same stream (views sampled,
  labels, cross-entropy), data loading included. Goal <= 1.05.
- `online_over_cached`: online-teacher distillation over cached distillation for a
  `vit_large_patch14_dinov2` teacher and a `fastvit_s12` student at the same resolution (random
  weights), beside `online_over_cached_ideal` = 1 + teacher forward / cached student step, both measured
  here. Goal: online_over_cached >= 0.95 x ideal (the cache removes nearly all of the teacher's cost).

Both time the library's own path (`kt.student.stream.ReplayStream` + `kt.student.distill.Distiller`) step by
step after warm-up, alternating the two modes in rounds so that machine noise hits both; the median
step of each mode is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kt.shards import BadSamples, expand_shards, iter_samples
from kt.views import VIEW_PRESETS, ViewSet
from kt.student.dataset import CacheSource
from kt.student.distill import Distiller, FreshSource
from kt.student.losses import create_objective
from kt.student.stream import ReplayStream, ShardData, StreamSpec, stream_loader
from kt.teacher_cache.build import BuildConfig, build_cache
from kt.teacher_cache.reader import CacheReader

DATA = Path(__file__).resolve().parent.parent / "data" / "fashion-mnist"


class LabelSource:
    """The supervised baseline's source: keys and labels of a data shard, views sampled fresh."""

    def __init__(self, urls):
        self.labels = {u: [] for u in urls}
        self.keys = {u: [] for u in urls}
        for s in iter_samples(urls, decode=False, bad=BadSamples(1.0)):
            self.keys[s.shard].append(s.key)
            self.labels[s.shard].append(s.label)

    def __call__(self, url) -> ShardData:
        labels = np.array(self.labels[url])
        return ShardData(self.keys[url], None, None, lambda rows, views: {"labels": labels[rows]})


def timed_steps(loader_fn, step_fn, steps: int, warmup: int = 2) -> list[float]:
    """Per-step wall times (data wait + step) after warm-up."""
    times, it = [], iter(loader_fn())
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(it)
        step_fn(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def sgd_step(modules, opt, loss_fn):
    def step(batch):
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ensure_data():
    if not (DATA / "train").exists():
        from tools.make_shards import make_fashion_mnist

        make_fashion_mnist(DATA)


def bench_cached_vs_supervised(args, tmp: Path) -> dict:
    from kt.models import create_model

    ensure_data()
    urls = expand_shards(str(DATA / "train" / "train-000000.tar"))
    cache = tmp / "logits.zarr"
    teacher = create_model("test_efficientnet", num_classes=10, image_size=64)
    ckpt = tmp / "teacher"
    from kt.checkpoints import save_checkpoint

    save_checkpoint(teacher.eval(), ckpt, classes=[str(i) for i in range(10)])
    build_cache(BuildConfig(teacher=str(ckpt), data=urls[0], out=str(cache), views=2, targets=["logits"],
                            image_size=64, batch_size=128, workers=args.workers))
    reader = CacheReader(str(cache), targets=["logits"])
    sizes = (len(reader.shard(urls[0], []).keys),)
    spec = StreamSpec(tuple(urls), sizes, args.batch_size, seed=0, workers=args.workers)
    torch.manual_seed(0)
    student = create_model(args.student, num_classes=10, image_size=args.image_size)
    objective = create_objective("task", {"num_classes": 10, "embedding": student.embedding_dim,
                                          "grid": student.grid_dim}, {"num_classes": 10})
    distiller = Distiller(student, objective)
    opt = torch.optim.AdamW(distiller.parameters(), lr=1e-4)
    labels = LabelSource(urls)

    def cached_loader():
        return stream_loader(ReplayStream(spec, 0, 0, CacheSource(reader, ["logits"]), reader.view_set,
                                          "cycle", args.image_size,
                                          student.mean, student.std))

    def supervised_loader():
        return stream_loader(ReplayStream(spec, 0, 0, labels, ViewSet(VIEW_PRESETS["train"], 0, 2), "cycle",
                                          args.image_size, student.mean, student.std))

    cached_step = sgd_step(distiller, opt, lambda b: distiller(b)[0])
    supervised_step = sgd_step(distiller, opt,
                               lambda b: F.cross_entropy(student(b["x"]), b["targets"]["labels"].long()))
    cached, supervised = [], []
    for _ in range(args.rounds):
        supervised += timed_steps(supervised_loader, supervised_step, args.steps)
        cached += timed_steps(cached_loader, cached_step, args.steps)
    print(json.dumps({"supervised_steps_s": supervised, "cached_steps_s": cached}), file=sys.stderr)
    c, s = statistics.median(cached), statistics.median(supervised)
    return {"cached_over_supervised": c / s, "cached_step_s": c, "supervised_step_s": s,
            "student": args.student, "image_size": args.image_size, "batch_size": args.batch_size}


def bench_online_vs_cached(args, tmp: Path) -> dict:
    from kt.checkpoints import save_checkpoint
    from kt.models import create_model

    ensure_data()
    urls = expand_shards(str(DATA / "test" / "test-000000.tar"))
    size, batch = args.vit_size, args.vit_batch
    torch.manual_seed(0)
    teacher = create_model(args.teacher, num_classes=0, image_size=size).eval()
    ckpt = tmp / "vit"
    save_checkpoint(teacher, ckpt)
    n_images = batch * (args.vit_steps + 3) * args.rounds
    subset = tmp / "subset"
    from kt.shards import write_shards

    samples = [s for _, s in zip(range(n_images), iter_samples(urls, keep_raw=True))]
    sub_urls = write_shards(samples, subset, prefix="sub", maxcount=n_images)
    cache = tmp / "vit.zarr"
    build_cache(BuildConfig(teacher=str(ckpt), data=sub_urls[0], out=str(cache), views=1, targets=["patches"],
                            batch_size=batch, workers=args.workers, codec=["patches=fp16"]))
    reader = CacheReader(str(cache), targets=["patches"])
    spec = StreamSpec(tuple(sub_urls), (n_images,), batch, seed=0, workers=args.workers)
    student = create_model(args.vit_student, num_classes=0, image_size=size)
    objective = create_objective("patch-cosine", {"embedding": student.embedding_dim, "grid": student.grid_dim},
                                 {"patches": teacher.grid_dim})
    cached_model, online_model = Distiller(student, objective), Distiller(student, objective, teacher)
    opt = torch.optim.AdamW(cached_model.parameters(), lr=1e-4)
    keys = {sub_urls[0]: [s.key for s in samples]}

    def cached_loader():
        return stream_loader(ReplayStream(spec, 0, 0, CacheSource(reader, ["patches"]),
                                          ViewSet(reader.view_spec, reader.seed, 1), "cycle", size, student.mean, student.std))

    def online_loader():
        return stream_loader(ReplayStream(spec, 0, 0, FreshSource(keys),
                                          ViewSet(reader.view_spec, reader.seed, 1), "cycle", size, student.mean, student.std, teacher_size=size,
                                          teacher_norm=(teacher.mean, teacher.std)))

    def teacher_only():
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            teacher.forward_features(x)

    cached, online, forward = [], [], []
    for _ in range(args.rounds):
        cached += timed_steps(cached_loader, sgd_step(cached_model, opt, lambda b: cached_model(b)[0]),
                              args.vit_steps)
        online += timed_steps(online_loader, sgd_step(online_model, opt, lambda b: online_model(b)[0]),
                              args.vit_steps)
        for _ in range(args.vit_steps):
            start = time.perf_counter()
            teacher_only()
            forward.append(time.perf_counter() - start)
    c, o, f = statistics.median(cached), statistics.median(online), statistics.median(forward)
    ratio, ideal = o / c, 1 + f / c
    return {"online_over_cached": ratio, "online_over_cached_ideal": ideal, "fraction_of_ideal": ratio / ideal,
            "vit_cached_step_s": c, "vit_online_step_s": o, "vit_teacher_forward_s": f, "teacher": args.teacher,
            "student_vit": args.vit_student, "vit_image_size": size, "vit_batch_size": batch}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench distill", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--student", default="mobilevitv2_050")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--teacher", default="vit_large_patch14_dinov2")
    p.add_argument("--vit-student", default="fastvit_s12")
    p.add_argument("--vit-size", type=int, default=56, help="teacher and student input (a multiple of 14)")
    p.add_argument("--vit-batch", type=int, default=8)
    p.add_argument("--vit-steps", type=int, default=4)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: supervised, online")
    return p


def run(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "supervised" not in args.skip:
            out.update(bench_cached_vs_supervised(args, Path(tmp)))
        if "online" not in args.skip:
            out.update(bench_online_vs_cached(args, Path(tmp)))
    out["steps_per_mode"] = {"small": args.steps * args.rounds, "vit": args.vit_steps * args.rounds}
    return out


if __name__ == "__main__":
    print(json.dumps(run(build_parser().parse_args()), indent=2))
