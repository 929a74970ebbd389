"""The one-time teacher job: every view of every transfer-set image through the teacher, into the cache.

    kt-cache build --teacher runs/teacher/checkpoint --data 'data/fashion-mnist/train' \
        --out runs/cache.zarr --views 4 --seed 0 --targets logits,embedding,patches
    accelerate launch -m kt.teacher_cache.cli build ...        # ranks take disjoint input shards

Pipeline, per process:
- DataLoader workers read this rank's incomplete input shards (one worker per shard at a time), decode,
  sample each view's parameters from (spec, seed, key, view) and render the teacher's input. At this
  point we have batches that each belong to one input shard, in sample order, views consecutive.
- The main thread only runs the teacher (one backbone pass gives logits, embedding and grid). On a GPU the
  workers send uint8 views, normalised there; the teacher is replayed as one captured CUDA graph per batch
  (`GraphedTeacher`: Python threads beside an op-by-op forward slow its ~400 launches, see its docstring);
  and one batch is in flight, so that the host's work between batches overlaps the teacher's. Patch grids
  are encoded there too, before the copy back (`kt.teacher_cache.device_encode`, `--device-encode`): the
  host's PCA projection of ViT-L tokens was the build's heaviest CPU work.
- The writer (`kt.teacher_cache.writer`) encodes each batch as it comes and, at a shard's end, writes the
  shard and its completion marker (`kt.teacher_cache.store`). Beside a GPU teacher it is a thread, so
  neither encoding nor I/O stalls the teacher (a bounded queue keeps the teacher from running away from a
  slow store); beside a CPU teacher it works in the teacher's thread, between batches, because a thread
  there would only take cores from the teacher's own (`--writer-threads`). Samples whose teacher outputs
  are not finite are left out there and counted as bad samples.
- Keys must be unique: reading refuses a key twice in one shard, and once every rank is done the build
  refuses a key in two shards (`check_unique_keys`). Each sample's content digest is stored beside its
  targets, so readers can tell the targets belong to these pixels, not only to this key.

Resume is the store's: complete shards are skipped, the rest are redone from their first sample. Codecs
that need fitting (PCA) are fitted once, by rank 0, on the teacher's outputs for the first views of the
first input shards, and stored; every rank and every resumed run decodes with that stored state. A single
process takes those outputs from its own stream (`StreamFit`) instead of a second teacher pass.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kt.config import accelerate_cpu, check_config, config_dict, field, run_record
from kt.device import BOUND_MIN_S, BOUND_SHARE
from kt.device import CHANNELS_LAST_HELP, Placement, keep_freed_memory, model_device, placement, set_channels_last
from kt.errors import UserError
from kt.checkpoints import load_model, model_fingerprint
from kt.models import TARGETS, TaskModel, teacher_targets
from kt.shards import BadSamples, decode_image, expand_shards, iter_samples, load_classes, split_urls
from kt.render import decode_for_views, normalize, render_view, uint8_views, worker_tensor
from kt.render_tensor import images_to_tensors, render_batch, render_device_for
from kt.views import ViewSet, ViewSpec, load_view_spec, partner_row
from kt.teacher_cache.codecs import DEFAULT_CODECS, Codec, parse_codec, split_codec_flags
from kt.teacher_cache.device_encode import HEAVY as DEVICE_ENCODED, encode_outputs, encoders as device_encoders
from kt.teacher_cache.lock import StoreLock
from kt.teacher_cache.store import CacheStore, shard_id_for
from kt.teacher_cache.writer import ShardEnd, TeacherBatch, Writer, finite_rows

@dataclass
class BuildConfig:
    teacher: str = field("", "teacher: run folder, checkpoint folder (finetuned) or a model name (with --pretrained)")
    pretrained: str = field("none", "weights when --teacher is a model name: none | package | hub | PATH")
    output_stride: int | None = field(None, "a teacher given by model name is built as a segmentation backbone at "
                                            "this output stride (8 | 16 | 32), so `patches` is its stride-N grid "
                                            "(the task-agnostic target of a segmentation student); its head is "
                                            "untrained, so only patches are cached from it. None: as named; a "
                                            "checkpoint keeps its own stride", choices=(8, 16, 32))
    data: str = field("", "transfer-set shards (shard spec)")
    out: str = field("", "cache store: local path or fsspec URL")
    views: int = field(4, "views per image; students cycle through them across epochs", min=1)
    seed: int = field(0, "view seed; the student replays views from it", min=0)
    targets: list = field(["logits"], "what to cache: logits,embedding,patches (classification teacher) or "
                                      "seg_logits,patches (segmentation teacher)")
    view_spec: str = field("light", "view preset name, JSON or file; the student replays the same. light (crops of "
                                    "35-100% of the image, flip, mild jitter) distilled 4.4 points better than train (ImageNet's "
                                    "crops and RandAugment) on small images, whose train views the teacher misreads; "
                                    "check yours with kt-cache plan --labeled (docs/results.md)")
    image_size: int = field(0, "teacher input size (0: the checkpoint's)", min=0)
    batch_size: int = field(64, "teacher batch size", min=1)
    workers: int = field(2, "DataLoader workers decoding and rendering", min=0)
    render: str = field("auto", "where views are rendered: auto (today the DataLoader workers: a build with the "
                                "GPU path ran slower, see docs/benchmarks.md) | cpu | cuda; both give the same "
                                "views within 1/255",
                        choices=("auto", "cpu", "cuda"))
    writer_threads: int = field(-1, "threads encoding, compressing and writing targets; -1: none when the teacher "
                                    "runs on the CPU (the work is done in its thread: a writer thread would take "
                                    "cores from the teacher's own), on a GPU 1, or 3 with seg_logits or host-encoded patches "
                                    "(within a quarter of the cores); raise it when the writer limits the build "
                                    "(python -m tools.bench pipeline: views/s per thread)",
                                min=-1)
    codec: list = field([], "TARGET=SPEC overrides of the default codecs, e.g. logits=topk:k=10")
    max_bad_fraction: float = field(0.01, "fail when more than this fraction of samples is corrupt", min=0, max=1)
    fit_views: int = field(256, "teacher outputs sampled to fit PCA codecs", min=1)
    channels_last: bool = field(False, CHANNELS_LAST_HELP)
    teacher_graph: bool = field(True, "on CUDA, run the teacher as one captured CUDA graph per batch: a ViT-L/14 "
                                      "forward is ~400 kernel launches, and Python threads beside it (the "
                                      "DataLoader's, the writer's) slow launching enough to halve the build "
                                      "(docs/benchmarks.md); --no-teacher-graph runs it op by op")
    device_encode: str = field("auto", "encode patches where the teacher runs, before the copy back (int8, pca and "
                                       "fp16 codecs): auto (on CUDA; the host's PCA projection of ViT-L tokens "
                                       "needs a core per ~700-1,900 views/s) | on | off",
                               choices=("auto", "on", "off"))
    teacher_precision: str = field("bf16", "teacher forwards on CUDA: bf16 autocast (about 2x the throughput; "
                                           "fidelity in docs/benchmarks.md) | fp32; on CPU always fp32")
    overwrite: bool = field(False, "replace a cache of another teacher/view spec at --out")


# -------------------------------------------------------------------------------------------- teacher
def teacher_outputs(model: TaskModel, x: torch.Tensor, targets: Sequence[str],
                    place: Placement | None = None) -> dict[str, np.ndarray]:
    """`kt.models.teacher_targets` of one batch as float32 numpy arrays, as the codecs take them.

    `x` goes to the model's device; `place` sets the precision there (default: fp32)."""
    return launch_teacher(model, x, targets, place).result()


@dataclass
class TeacherRun:
    """One batch's teacher outputs on their way to the host: on CUDA the copies are queued behind the forward
    (into pinned memory) and `result` waits for them; on a CPU they are done already. With device encoders
    (`kt.teacher_cache.device_encode`) some targets come back encoded (`encoded`), with their rows' finite
    flags, instead of raw."""

    host: dict[str, torch.Tensor]
    done: "torch.cuda.Event | None"
    encoded: dict[str, dict[str, torch.Tensor]] = dc_field(default_factory=dict)
    finite: dict[str, torch.Tensor] = dc_field(default_factory=dict)

    def result(self) -> dict[str, np.ndarray]:
        """The raw targets (those not encoded on the device)."""
        if self.done is not None:
            self.done.synchronize()
        return {t: v.numpy() for t, v in self.host.items()}

    def encoded_parts(self) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """(target -> part -> (b, ...), target -> (b,) finite) of the targets encoded on the device; after `result`."""
        return ({t: {p: v.numpy() for p, v in parts.items()} for t, parts in self.encoded.items()},
                {t: v.numpy() for t, v in self.finite.items()})


def launch_teacher(model, x: torch.Tensor, targets: Sequence[str], place: Placement | None = None,
                   encoders: dict | None = None) -> TeacherRun:
    """`teacher_outputs` without waiting for a GPU: the forward and the copies back are queued, and the caller
    can do host work (fetch and copy the next batch, encode the last one) while the GPU computes. `model`
    may be a `GraphedTeacher`. `encoders` (`device_encode.encoders`) encode their targets where the forward
    ran, before the copy back."""
    place = place or placement(model_device(model), "fp32")
    if isinstance(model, GraphedTeacher):
        out = model(place.to(x))
    else:
        with torch.inference_mode(), place.teacher_autocast():
            out = teacher_targets(model, place.to(x), targets)
    encoded, finite = {}, {}
    if encoders:
        with torch.inference_mode():
            out, encoded, finite = encode_outputs(out, encoders)
    cuda = place.device.type == "cuda"

    def back(v: torch.Tensor) -> torch.Tensor:
        # non_blocking device->host copies land in pinned memory (torch allocates it so), hence the event.
        # Contiguous: a CNN's patch grid is a channels-last view of NCHW features, and the codecs reduce and
        # quantise along its last axis, 10x slower strided (int8 of Lite2's 2x2x1280 grid: 3.3 vs 0.35 ms a
        # batch of 64)
        return v.contiguous().to("cpu", non_blocking=cuda)

    host = {t: back(v.float()) for t, v in out.items()}
    encoded = {t: {p: back(v) for p, v in parts.items()} for t, parts in encoded.items()}
    finite = {t: back(v) for t, v in finite.items()}
    done = None
    if cuda:
        done = torch.cuda.Event()
        done.record()
    return TeacherRun(host, done, encoded, finite)


class GraphedTeacher:
    """`teacher_targets` of a CUDA teacher captured once as a CUDA graph for `batch_size` views, replayed per
    batch: one launch instead of one per op. Measured on an H200 (docs/benchmarks.md): a ViT-L/14 forward
    launches ~400 kernels, and beside a busy Python thread the main thread waits for the GIL at every one of
    them (2,035 images/s alone, 15 beside a pure-Python loop); the build's DataLoader pin thread and writer
    thread are such threads, and they held the eager teacher to ~0.5 of its forward.

    A shorter batch (a shard's last) fills the first rows of the static input; the other rows keep the last
    batch's data and their outputs are dropped (eval-mode rows are independent). Capture follows PyTorch's
    recipe: warm-up on a side stream, autocast without its weight cache. `capture` returns None (and the build
    runs eagerly) when the model cannot be captured, e.g. it synchronises with the host in its forward."""

    def __init__(self, model: TaskModel, targets: Sequence[str], place: Placement, batch_size: int, image_size: int):
        self.x = torch.zeros(batch_size, 3, image_size, image_size, device=place.device)
        autocast = torch.autocast("cuda", dtype=place.teacher_dtype or torch.bfloat16,
                                  enabled=place.teacher_dtype is not None, cache_enabled=False)

        def forward() -> dict[str, torch.Tensor]:
            return {t: v.float() for t, v in teacher_targets(model, self.x, targets).items()}

        with torch.cuda.device(place.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), autocast, torch.cuda.stream(side):
                for _ in range(2):  # cuBLAS/cuDNN handles and workspaces exist before the capture
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), autocast, torch.cuda.graph(self.graph):
                self.out = forward()

    @classmethod
    def capture(cls, model, targets, place, batch_size, image_size) -> "GraphedTeacher | None":
        try:
            return cls(model, targets, place, batch_size, image_size)
        except Exception as e:  # noqa: BLE001 -- any capture failure leaves the eager teacher, which works
            import warnings

            warnings.warn(f"kt-cache build: the teacher could not be captured as a CUDA graph ({type(e).__name__}: "
                          f"{e}); it runs op by op", stacklevel=2)
            if place.device.type == "cuda" and torch.cuda.is_available():
                torch.cuda.synchronize(place.device)  # nothing of the failed capture left in flight
            return None

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(x)
        if n > len(self.x):
            raise ValueError(f"a batch of {n} views for a graph captured for {len(self.x)}")
        self.x[:n].copy_(x)
        self.graph.replay()
        return {t: v[:n] for t, v in self.out.items()}


def parse_targets(targets: Sequence[str] | str) -> list[str]:
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not names:
        raise UserError("no --targets given")
    for t in names:
        if t not in TARGETS:
            raise UserError(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    return names


# the task target each task's head gives: the other task's target is refused before anything runs
TASK_TARGETS = {"classification": "logits", "segmentation": "seg_logits"}


def load_teacher(teacher: str, pretrained: str, image_size: int, output_stride: int | None,
                 targets: Sequence[str], urls: Sequence[str]) -> TaskModel:
    """The teacher a build names, random init seeded (the same on every rank, rerun and `verify`); with
    `output_stride`, a model name built as a segmentation backbone at that stride, its untrained head sized to
    the transfer set's classes where it names them (one output otherwise)."""
    if output_stride is None:
        return load_model(teacher, pretrained=pretrained, image_size=image_size, seed=0, what="teacher").eval()
    if Path(teacher).expanduser().exists():
        raise UserError(f"--output-stride is for a teacher given by model name; {teacher} is a checkpoint and keeps "
                        "its own")
    untrained = [t for t in targets if t != "patches"]
    if untrained:
        raise UserError(f"--output-stride builds {teacher} with an untrained head: cache patches from it, not "
                        f"{', '.join(untrained)}")
    classes = load_classes(urls)
    return load_model(teacher, num_classes=len(classes) if classes else 1, pretrained=pretrained,
                      image_size=image_size, task="segmentation", seed=0, what="teacher",
                      output_stride=output_stride).eval()


def check_teacher_targets(names: Sequence[str], model: TaskModel) -> None:
    for task, target in TASK_TARGETS.items():
        if target not in names:
            continue
        if model.num_classes <= 0:
            raise UserError(f"target {target} needs a teacher with a task head ({task}); {model.arch} has none "
                            "(finetune it first, or cache embedding/patches)")
        if model.task != task:
            raise UserError(f"target {target} needs a {task} teacher; {model.arch} is a {model.task} model "
                            f"(cache {TASK_TARGETS[model.task]} from it, or give a {task} teacher)")


def task_attributes(model: TaskModel, shapes: dict[str, tuple], image_size: int) -> dict:
    """What task the cache's targets serve, read by the student before it builds anything: the task, its
    classes, and for segmentation the teacher's output stride and logit grid (the student resizes the cached
    logits from that grid to its own)."""
    out = {"task": model.task, "num_classes": model.num_classes, "image_size": image_size}
    if model.task == "segmentation":
        grid = shapes["seg_logits"][1:] if "seg_logits" in shapes else model.grid_size(image_size)
        out.update(output_stride=model.output_stride, grid=[int(g) for g in grid])
    return out


def parse_codecs(specs: Sequence[str], targets: Sequence[str]) -> dict[str, Codec]:
    chosen = {t: DEFAULT_CODECS[t] for t in targets}
    for item in split_codec_flags(specs):  # as --codec splits them, for a YAML `codec` list or string too
        if "=" not in item:
            raise UserError(f"--codec takes TARGET=SPEC, got {item!r}")
        target, spec = item.split("=", 1)
        if target not in chosen:
            raise UserError(f"--codec for {target!r}, which is not among --targets ({', '.join(targets)})")
        chosen[target] = spec
    return {t: parse_codec(spec, t) for t, spec in chosen.items()}


def fit_default_codecs(codecs: dict[str, Codec], shapes: dict[str, tuple], overrides: Sequence[str]) -> dict[str, Codec]:
    """A default top-k codec (`topk:k=10`, `pixel-topk:k=5`) on a teacher with fewer than k classes would be
    refused (k exceeds the classes); there the default becomes `fp16`, exact and smaller than keeping every class
    with indices and a tail. A top-k given with --codec for more classes than the teacher has, or a PCA of more
    components than the target has channels, is refused here, before the store exists, not at the fit."""
    given = {item.split("=", 1)[0] for item in split_codec_flags(overrides)}
    out = dict(codecs)
    for target, codec in codecs.items():
        d = getattr(codec, "d", None)  # a PCA size, checked here too: a failed fit would leave a store behind
        if d is not None and d > shapes[target][-1]:
            raise UserError(f"--codec {target}={codec.spec}: d={d} exceeds the {shapes[target][-1]} channels of "
                            f"{target} (use d <= {shapes[target][-1]})")
        k = getattr(codec, "k", None)
        classes = shapes[target][codec.class_axis] if k is not None else None
        if k is None or k <= classes:
            continue
        if target in given:
            raise UserError(f"--codec {target}={codec.spec}: k={k} is more than the teacher's {classes} classes "
                            f"(use k <= {classes}, or fp16)")
        out[target] = parse_codec("fp16", target)
    return out


def item_shapes(model: TaskModel, targets: Sequence[str], image_size: int) -> dict[str, tuple[int, ...]]:
    with torch.inference_mode():
        out = teacher_outputs(model.eval(), torch.zeros(1, 3, image_size, image_size), targets)
    return {t: tuple(v.shape[1:]) for t, v in out.items()}


def cache_attributes(model: TaskModel, spec: ViewSpec, cfg: BuildConfig, codecs: dict[str, Codec],
                     shapes: dict[str, tuple], urls: Sequence[str]) -> dict:
    record = run_record(cfg)
    build = config_dict(cfg)
    # local paths absolute: `kt-cache verify` takes its default teacher and data from here, from any directory
    if os.path.exists(cfg.teacher):
        build["teacher"] = os.path.abspath(cfg.teacher)
    return {
        "teacher": model_fingerprint(model),
        "view": {"spec": spec.to_dict(), "seed": cfg.seed, "views_per_image": cfg.views,
                 "image_size": cfg.image_size or model.image_size},
        "targets": {t: {"codec": c.spec, "item_shape": list(shapes[t])} for t, c in codecs.items()},
        "input_shards": {shard_id_for(u): u if "://" in u else os.path.abspath(u) for u in urls},
        "versions": record["versions"],
        "git_revision": record["git_revision"],
        "build_config": build,
    }


# ---------------------------------------------------------------------------------------------- data
@dataclass
class ViewBatch:
    """Rendered teacher views of one input shard: `rows` index the shard's good samples (its `ShardEnd.keys`)."""

    url: str
    rows: np.ndarray  # (b,) sample index within the shard's good samples
    views: np.ndarray  # (b,) view index
    keys: list[str]
    params: np.ndarray  # (b, P)
    # (b, 3, S, S) the teacher's input, normalised float32, or uint8 views normalised on the teacher's GPU;
    # device_render: b uint8 (3, H, W) sources
    x: torch.Tensor | list[torch.Tensor]

    def pin_memory(self) -> "ViewBatch":
        """Called by the DataLoader's pin thread (a dataclass is otherwise passed through unpinned)."""
        self.x = [t.pin_memory() for t in self.x] if isinstance(self.x, list) else self.x.pin_memory()
        return self


class ShardViewBatches(IterableDataset):
    """`ViewBatch`es of rendered teacher views, each from one input shard, and a `ShardEnd` after each shard.

    With `device_render` the workers only decode: x is the views' decoded uint8 sources, rendered as one
    batch on the teacher's GPU (`kt.render_tensor.render_batch`) from the same params. With `uint8` the
    rendered views stay uint8, for the consumer to `normalize` on its device."""

    def __init__(self, urls: Sequence[str], view_set: ViewSet, image_size: int, mean, std, batch_size: int,
                 device_render: bool = False, uint8: bool = False):
        self.urls, self.view_set = list(urls), view_set
        self.image_size, self.mean, self.std, self.batch_size = image_size, mean, std, batch_size
        self.device_render, self.uint8 = device_render, uint8

    def __iter__(self) -> Iterator[ViewBatch | ShardEnd]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for url in split_urls(self.urls, worker=wid, num_workers=nw):
            yield from self.shard_batches(url)

    def shard_batches(self, url: str) -> Iterator[ViewBatch | ShardEnd]:
        bad = BadSamples(max_fraction=1.0)
        keys: list[str] = []
        digests: list[int] = []
        buf: list[tuple[int, int, np.ndarray, torch.Tensor]] = []  # (row, view, params, x)
        views: dict[str, np.ndarray] = {}

        def decode(key: str, data: bytes):
            # a JPEG decodes at the reduced scale that all of its views still allow (kt.render)
            views[key] = np.stack([self.view_set.params(key, v) for v in range(self.view_set.views)])
            if self.device_render:  # the GPU path renders from the full image
                return decode_image(data)
            return decode_for_views(data, views[key], self.image_size)

        # iter_samples refuses a key seen twice in the shard; keys across shards are checked at the end
        samples = iter_samples([url], bad=bad, digest=True, decode=decode)
        mixed = self.view_set.spec.mixes
        if mixed:  # a mixed view's partner is any good sample of the shard: read the shard whole first (its
            samples = list(samples)  # decoded images stay in memory until the shard is done)
            shard_params = [views[s.key] for s in samples]
        for sample in samples:
            row = len(keys)
            keys.append(sample.key)
            digests.append(sample.digest)
            source = images_to_tensors([sample.image], "cpu")[0] if self.device_render else None
            for v, params in enumerate(views.pop(sample.key)):
                if self.device_render:
                    x = source
                else:
                    partner = partner_row(params, row, len(samples)) if mixed else None
                    view = render_view(sample.image, params, self.image_size,
                                       *((samples[partner].image, shard_params[partner][v]) if partner is not None
                                         else ()))
                    x = worker_tensor(view, self.mean, self.std, self.uint8)
                buf.append((row, v, params, x))
                if len(buf) == self.batch_size:
                    yield self._batch(url, buf, keys)
                    buf = []
        if buf:
            yield self._batch(url, buf, keys)
        yield ShardEnd(url, keys, np.asarray(digests, dtype=np.uint64), bad.bad, bad.total)

    def _batch(self, url: str, buf: list[tuple], keys: list[str]) -> ViewBatch:
        rows = np.array([row for row, *_ in buf])
        x = [x for *_, x in buf]
        return ViewBatch(url, rows, np.array([v for _, v, *_ in buf]), [keys[i] for i in rows],
                         np.stack([p for _, _, p, _ in buf]), x if self.device_render else torch.stack(x))


def view_loader(urls, view_set: ViewSet, image_size, mean, std, batch_size, workers,
                pin_memory: bool = False, device_render: bool = False, uint8: bool = False) -> DataLoader:
    dataset = ShardViewBatches(urls, view_set, image_size, mean, std, batch_size, device_render, uint8)
    workers = min(workers, len(urls))
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


# ----------------------------------------------------------------------------------------- the build


class BuildClock:
    """Where the build loop's wall time goes, for the summary: waiting on the DataLoader (decode + render:
    the data path), the teacher (queueing its forward, with the host->device copy and a GPU render or
    normalisation; on a CPU the whole forward), waiting for the teacher's outputs (a GPU still computing),
    and the writer (encoding when it runs in the teacher's thread, a full queue when its thread falls
    behind, the final flush). `first_batch` is the time until the first batch reached the teacher (worker
    start, first decodes, on a CPU its forward too); the steady rate leaves it out, so that a short run's
    start-up does not pass for the pipeline's throughput."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.spent = {"loader_wait": 0.0, "teacher": 0.0, "teacher_wait": 0.0, "writer": 0.0}
        self.first_batch_s: float | None = None
        self.first_views = 0

    def next(self, loader):
        item = next(loader, None)
        self.lap("loader_wait")
        return item

    def lap(self, what: str, views: int = 0) -> None:
        now = time.perf_counter()
        self.spent[what] += now - self.last
        self.last = now
        if views and self.first_batch_s is None:
            self.first_batch_s, self.first_views = now - self.start, views

    @property
    def elapsed(self) -> float:
        return self.last - self.start

    def summary(self, n_views: int) -> dict:
        first = self.first_batch_s or 0.0
        rest = n_views - self.first_views
        return {"time_s": {k: round(v, 3) for k, v in self.spent.items()} | {"first_batch": round(first, 3)},
                "steady_views_per_s": rest / max(self.elapsed - first, 1e-9) if rest > 0 else 0.0}


def bottleneck(time_s: dict, elapsed: float, cfg: "BuildConfig", device: torch.device,
               device_render: bool) -> tuple[str, str | None]:
    """What bounded the build's loop after its first batch: "data" (the teacher waited on the DataLoader),
    "writer" (encoding and writing, in the teacher's thread or a full queue) or "teacher", and for the first
    two one line saying which knob to turn (None for a short loop or a teacher-bound one). The wait for the
    first batch (worker start-up) is left out of the data path's share."""
    loop = elapsed - time_s.get("first_batch", 0.0)
    data = max(time_s["loader_wait"] - time_s.get("first_batch", 0.0), 0.0) / max(loop, 1e-9)
    writer = time_s["writer"] / max(loop, 1e-9)
    bound = "data" if data > max(writer, BOUND_SHARE) else "writer" if writer > BOUND_SHARE else "teacher"
    if bound == "teacher" or loop < BOUND_MIN_S:
        return bound, None
    if bound == "data":
        more = ["more --workers (now {}, {} cores here)".format(cfg.workers, os.cpu_count())]
        if device.type == "cuda" and not device_render:
            more.append("--render cuda (the workers then only decode)")
        return bound, (f"the teacher waited on the DataLoader for {data:.0%} of the build: decoding and rendering "
                       f"limit it (`kt-cache plan --measure` times them on these images); try "
                       + " or ".join(more))
    return bound, (f"the writer took {writer:.0%} of the build: encoding and writing targets limit it; "
                   f"try more --writer-threads (now {writer_threads(cfg, device)})"
                   + ("" if cfg.device_encode != "off" or device.type != "cuda" else " or --device-encode on"))


def fit_codecs(model: TaskModel, codecs: dict[str, Codec], urls: Sequence[str], view_set: ViewSet,
               image_size: int, batch_size: int, n_views: int, place: Placement | None = None) -> None:
    """Fit codecs that learn from data (PCA) on the teacher's outputs for the first views of the data."""
    rows = FitRows(codecs, n_views)
    if not rows.needs:
        return
    for item in ShardViewBatches(urls, view_set, image_size, model.mean, model.std, batch_size):
        if isinstance(item, ViewBatch):
            with torch.inference_mode():
                raw = teacher_outputs(model, item.x, rows.needs, place)
            if rows.add(raw):
                break
    rows.fit()


def codecs_to_fit(codecs: dict[str, Codec]) -> list[str]:
    return [t for t, c in codecs.items() if type(c).fit is not Codec.fit]


class FitRows:
    """What the codecs that learn from data are fitted on: the teacher's finite rows (of those targets), batch
    after batch in the data's order, up to `n_views`. One collection for both ways the build fits
    (`fit_codecs`, `StreamFit`), so the two give the same basis."""

    def __init__(self, codecs: dict[str, Codec], n_views: int):
        self.codecs, self.needs, self.n_views = codecs, codecs_to_fit(codecs), n_views
        self.got: dict[str, list[np.ndarray]] = {t: [] for t in self.needs}
        self.n = 0

    def add(self, raw: dict[str, np.ndarray]) -> bool:
        """Take one batch's outputs; True once `n_views` rows are in."""
        # a non-finite output would poison the basis; the build drops it anyway
        finite = finite_rows({t: raw[t] for t in self.needs})
        for t in self.needs:
            self.got[t].append(raw[t][finite])
        self.n += int(finite.sum())
        return self.n >= self.n_views

    def fit(self) -> None:
        if not self.n:
            raise UserError("no sample of the transfer set decodes with finite teacher outputs: nothing to fit "
                            f"the {', '.join(self.needs)} codec on")
        for t in self.needs:
            self.codecs[t].fit(np.concatenate(self.got[t])[:self.n_views])


class StreamFit:
    """The codec fit of a fresh single-process build, taken from the build's own stream.

    `fit_codecs` runs the teacher once more over the first views of the data before the build starts; a
    single process gets the same views from its own stream (its shards are all the shards, in order), so
    this holds the stream's first items back, fits on the same views in the same order (the first
    `n_views` finite rows of the first shards, shard by shard: DataLoader workers interleave shards, each
    shard's batches still arrive in order), and then lets the held items through. The store is bit for bit
    the one `fit_codecs` makes, with no second forward of the fit views (measured: most of the build's
    fixed cost, docs/benchmarks.md). Several processes keep `fit_codecs`: rank 0's stream is not the
    first shards."""

    def __init__(self, codecs: dict[str, Codec], urls: Sequence[str], n_views: int):
        self.rows, self.urls = FitRows(codecs, n_views), list(urls)
        self.held: list[TeacherBatch | ShardEnd] = []
        self.batches: dict[str, list[TeacherBatch]] = {u: [] for u in self.urls}
        self.ended: set[str] = set()
        self.shard, self.taken = 0, 0  # the data's order: batches of urls[shard] handed to `rows` so far

    def add(self, item: TeacherBatch | ShardEnd) -> bool:
        """Hold `item`; True once the fit views are all in (the fit is then made: call `release`)."""
        self.held.append(item)
        if isinstance(item, TeacherBatch):
            self.batches[item.url].append(item)
        else:
            self.ended.add(item.url)
        while self.shard < len(self.urls):  # hand on, in the data's order, what has arrived of it
            url = self.urls[self.shard]
            while self.taken < len(self.batches[url]):
                self.taken += 1
                if self.rows.add(self.batches[url][self.taken - 1].raw):
                    self.rows.fit()
                    return True
            if url not in self.ended:
                return False
            self.shard, self.taken = self.shard + 1, 0
        self.rows.fit()  # every shard ended: fit on what there is
        return True

    def release(self) -> list[TeacherBatch | ShardEnd]:
        held, self.held = self.held, []
        return held


def encode_held(item: TeacherBatch | ShardEnd, encs: dict, device: torch.device) -> TeacherBatch | ShardEnd:
    """A batch held raw for the codec fit (`StreamFit`, and the one in flight when the fit was made), encoded
    where the teacher runs, as every later batch is. Host and device encoders agree only to the last bits (a
    float32 matmul in another order: one int8 step in ~1e-5 of PCA coefficients), so a fresh single-process
    build that encoded its first views on the host would not write what a resumed or a multi-process build
    writes (both encode every view on the device). The raw float32 copies are the teacher's outputs exactly,
    so the encoders see the same values."""
    if not isinstance(item, TeacherBatch) or not any(t in item.raw for t in encs):
        return item
    todo = {t: e for t, e in encs.items() if t in item.raw}
    with torch.inference_mode():
        # every target goes in, so that a row non-finite in any of them is zeroed as launch_teacher does
        _, parts, finite = encode_outputs({t: torch.from_numpy(v).to(device) for t, v in item.raw.items()}, todo)
        encoded = {t: {p: v.cpu().numpy() for p, v in ps.items()} for t, ps in parts.items()}
        flags = {t: v.cpu().numpy() for t, v in finite.items()}
    return TeacherBatch(item.url, item.rows, item.views, item.params,
                        {t: v for t, v in item.raw.items() if t not in todo}, item.finite,
                        {**item.encoded, **encoded}, {**item.encoded_finite, **flags})


def write_codec_states(store: CacheStore, codecs: dict[str, Codec], shapes: dict[str, tuple]) -> None:
    for t, codec in codecs.items():
        codec.item_shape = shapes[t]
        store.write_codec_state(t, *codec.state())


def build_cache(cfg: BuildConfig) -> dict:
    """Run the build for this process's share of the input shards; returns a summary."""
    check_config(cfg)  # also when called as a library, not through build_config
    from accelerate import PartialState

    for name in ("teacher", "data", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    spec = load_view_spec(cfg.view_spec)
    if spec.mixes and cfg.render == "cuda":
        raise UserError(f"--render cuda does not render mixed views (view spec mix {spec.mix!r}); use --render cpu")
    render_device_for(cfg.render)  # a bad choice fails before anything loads
    keep_freed_memory()  # a CPU forward stops page-faulting its activations in every batch
    state = PartialState(cpu=accelerate_cpu())
    urls = expand_shards(cfg.data)
    ids = [shard_id_for(u) for u in urls]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"two input shards map to the cache shard id {dup!r}; give shards distinct names")
    targets = parse_targets(cfg.targets)
    codecs = parse_codecs(cfg.codec, targets)  # bad specs fail before the teacher loads
    out = urlsplit(cfg.out)
    if ("://" not in cfg.out or out.scheme == "file") and os.path.isfile(out.path if out.scheme else cfg.out):
        raise UserError(f"--out {cfg.out} is a file; a cache is a folder (a new path, or an existing cache)")
    # one writer per store, taken before the teacher loads so a second build is refused at once
    lock = StoreLock(cfg.out)
    refused = None
    if state.is_main_process:  # one lock per build; the other ranks write under rank 0's
        try:
            lock.acquire()
        except UserError as e:
            refused = str(e)
    if state.num_processes > 1:  # every rank stops with rank 0, none waits at a barrier alone
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused])[0]
    if refused:
        raise UserError(refused)
    try:
        return _build_locked(cfg, state, urls, spec, targets, codecs)
    finally:
        lock.release()


def _build_locked(cfg: BuildConfig, state, urls: Sequence[str], spec: ViewSpec, targets: list[str],
                  codecs: dict[str, Codec]) -> dict:
    """The build proper, run while rank 0 holds the store's lock."""
    from tqdm.auto import tqdm

    view_set = ViewSet(spec, cfg.seed, cfg.views)
    place = placement(state.device, cfg.teacher_precision)
    render_device = render_device_for(cfg.render, place.device)
    # a random init is seeded: one teacher per cache, the same on every rank and every rerun
    model = load_teacher(cfg.teacher, cfg.pretrained, cfg.image_size, cfg.output_stride, targets, urls)
    image_size = cfg.image_size or model.image_size
    if spec.mixes and model.task != "classification":
        raise UserError(f"view spec mix {spec.mix!r}: mixed views are for classification teachers (a {model.task} "
                        "teacher's per-pixel targets of two mixed images have no mask to follow)")
    check_teacher_targets(targets, model)
    shapes = item_shapes(model, targets, image_size)
    codecs = fit_default_codecs(codecs, shapes, cfg.codec)
    classes = load_classes(urls)  # recorded for the reader's "which transfer set" message only
    attrs = cache_attributes(model, spec, cfg, codecs, shapes, urls)
    attrs["task"] = task_attributes(model, shapes, image_size)
    attrs["transfer_classes"] = classes
    set_channels_last(model.to(place.device), cfg.channels_last)  # after the fingerprint (weights as loaded)

    stream_fit = None
    if state.is_main_process:
        store = CacheStore.create(cfg.out, attrs, overwrite=cfg.overwrite)
        if any(store.read_codec_state(t) is None for t in targets):  # a fresh cache (not a resumed one)
            if state.num_processes == 1 and codecs_to_fit(codecs):
                stream_fit = StreamFit(codecs, urls, cfg.fit_views)  # fitted on the build's first views
            else:
                fit_codecs(model, codecs, urls, view_set, image_size, cfg.batch_size, cfg.fit_views, place)
                write_codec_states(store, codecs, shapes)
    state.wait_for_everyone()
    if not state.is_main_process:
        store = CacheStore.open(cfg.out, mode="r+")

    done = store.completed()
    mine = [u for u in split_urls(urls, state.process_index, state.num_processes) if shard_id_for(u) not in done]
    summary = {"out": cfg.out, "rank": state.process_index, "shards_total": len(urls),
               "shards_skipped": len(split_urls(urls, state.process_index, state.num_processes)) - len(mine),
               "shards_written": 0, "samples": 0, "bad": 0, "views_per_s": 0.0, "device": str(place.device),
               "teacher_dtype": str(place.teacher_dtype or torch.float32).removeprefix("torch."),
               "codecs": {}, "writer_threads": writer_threads(cfg, place.device), "teacher_graph": False}
    if mine:
        writer = None if stream_fit else start_writer(store, cfg, state.process_index, place.device)
        bar = tqdm(desc=f"kt-cache build (rank {state.process_index})", unit="view", mininterval=1.0,
                   disable=not state.is_local_main_process, dynamic_ncols=True)
        uint8 = render_device is None and uint8_views(place.device)  # kt.render.UINT8_VIEWS
        teacher = model
        if cfg.teacher_graph and place.device.type == "cuda":
            teacher = GraphedTeacher.capture(model, targets, place, cfg.batch_size, image_size) or model
        summary["teacher_graph"] = isinstance(teacher, GraphedTeacher)
        clock = BuildClock()
        n_views = 0

        encode_on_device = cfg.device_encode == "on" or (cfg.device_encode == "auto" and place.device.type == "cuda")
        # target -> device encoder, once the codecs are fitted (a fit on the stream's first views needs them raw)
        encs = device_encoders(writer.codecs, targets, place.device) if writer is not None and encode_on_device else {}

        def emit(item: TeacherBatch | ShardEnd) -> None:
            nonlocal writer, encs
            if writer is None:  # the codecs are fitted on the stream's first views, then they go on
                if not stream_fit.add(item):
                    return
                write_codec_states(store, codecs, shapes)
                writer = start_writer(store, cfg, state.process_index, place.device)
                encs = device_encoders(writer.codecs, targets, place.device) if encode_on_device else {}
                for held in stream_fit.release():
                    writer.put(encode_held(held, encs, place.device) if encs else held)
            else:  # the batch in flight when the fit ended came back raw too
                writer.put(encode_held(item, encs, place.device) if encs else item)
            if isinstance(item, ShardEnd):
                bar.set_postfix(shards=f"{len(writer.written)}/{len(mine)}")

        def finish(batch: ViewBatch, run: TeacherRun) -> None:
            raw = run.result()
            encoded, encoded_finite = run.encoded_parts()
            clock.lap("teacher_wait")
            # every target of the view finite: the raw ones checked here, the encoded ones on the device
            finite = finite_rows(raw) if raw else np.ones(len(batch.rows), dtype=bool)
            for ok in encoded_finite.values():
                finite = finite & ok
            emit(TeacherBatch(batch.url, batch.rows, batch.views, batch.params, raw, finite, encoded, encoded_finite))
            clock.lap("writer")

        # one batch in flight: batch i's forward is queued on the GPU before batch i-1's outputs are waited
        # for, so that the host's work between batches overlaps the teacher's instead of idling the GPU
        pending: tuple[ViewBatch, TeacherRun] | None = None

        def finish_pending() -> None:
            nonlocal pending
            if pending is not None:
                finish(*pending)
                pending = None

        try:
            loader = iter(view_loader(mine, view_set, image_size, model.mean, model.std, cfg.batch_size,
                                      cfg.workers, pin_memory=place.pin_memory,
                                      device_render=render_device is not None, uint8=uint8))
            while (item := clock.next(loader)) is not None:
                if isinstance(item, ViewBatch):
                    if render_device is not None:  # sources: render the batch on the teacher's GPU
                        item.x = render_batch([s.to(render_device, non_blocking=place.non_blocking) for s in item.x],
                                              item.params, image_size, model.mean, model.std)
                    elif uint8:
                        item.x = normalize(place.to(item.x), model.mean, model.std)
                    run = launch_teacher(teacher, item.x, targets, place, encs)
                    item.x = None  # the input is the GPU's now: let the host memory go
                    n_views += len(item.rows)
                    bar.update(len(item.rows))
                    clock.lap("teacher", len(item.rows))
                    finish_pending()
                    pending = (item, run)
                else:
                    finish_pending()
                    emit(item)
                    clock.lap("writer")
            finish_pending()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            clock.lap("writer")
        summary.update(shards_written=len(writer.written), samples=sum(w["samples"] for w in writer.written),
                       bad=sum(w["bad"] for w in writer.written), views_per_s=n_views / max(clock.elapsed, 1e-9),
                       **clock.summary(n_views))
        summary["bound_by"], hint = bottleneck(summary["time_s"], clock.elapsed, cfg, place.device,
                                               render_device is not None)
        if hint and state.is_local_main_process:
            print(f"kt-cache build (rank {state.process_index}): {hint}", file=sys.stderr)
    summary["codecs"] = {t: c.spec for t, c in store.load_codecs().items()}  # what `auto` chose, among others
    state.wait_for_everyone()
    check_unique_keys(store, urls)
    check_bad_fraction(store, urls, cfg.max_bad_fraction)
    return summary


# targets whose encoding is the writer's heavy work: a PCA projection or int8 of every patch token, the
# top-k of every pixel. One thread encodes ViT-L/14 patches at 700-1,950 views/s (`python -m tools.bench
# pipeline`, writer.logits+embedding+patches), under one H200's 2,060 teacher views/s; logits + embedding
# run at 13,000-16,000. Beside a GPU, patches are encoded there (`--device-encode`, device_encode.HEAVY) unless
# that is turned off.
HEAVY_TARGETS = ("patches", "seg_logits")


def writer_threads(cfg: BuildConfig, device: torch.device) -> int:
    """`--writer-threads`, with -1 resolved: 0 next to a CPU teacher; next to a GPU one, 1 thread, or 3 when
    a heavy target is cached (HEAVY_TARGETS; threads encode batches in parallel, the store is the same bit
    for bit), never more than a quarter of the cores (the DataLoader workers need the rest). On the 2-core
    box (python -m tools.bench cache, docs/benchmarks.md) a writer thread beside a CPU teacher cost more
    than its own work: OpenMP threads of the teacher wait on the one it preempts."""
    if cfg.writer_threads >= 0:
        return cfg.writer_threads
    if torch.device(device).type == "cpu":
        return 0
    on_device = DEVICE_ENCODED if cfg.device_encode != "off" else ()
    heavy = any(t in HEAVY_TARGETS and t not in on_device for t in parse_targets(cfg.targets))
    return max(1, min(3 if heavy else 1, (os.cpu_count() or 1) // 4))


def start_writer(store: CacheStore, cfg: BuildConfig, rank: int, device: torch.device) -> Writer:
    """The writer, with the codecs as stored (a fresh build's fit goes through its stored state too)."""
    writer = Writer(store, cfg.views, store.load_codecs(), rank, threads=writer_threads(cfg, device))
    writer.start()
    return writer


def check_unique_keys(store: CacheStore, urls: Sequence[str]) -> None:
    """Refuse a transfer set with a key in two shards (within a shard, reading refuses it): the student would
    pair one key's targets with the other's image. Over every complete shard (keys arrays only), so that a
    rerun fails again; ranks take disjoint shards, so no rank could see this alone while building."""
    markers = store.completed()
    seen: dict[str, str] = {}
    for url in urls:
        shard_id = shard_id_for(url)
        if shard_id not in markers:
            continue
        for key in store.array(shard_id, "keys")[...]:
            key = str(key)
            if key in seen:
                raise UserError(f"duplicate sample key {key!r} in shards {seen[key]} and {url}; keys must be unique "
                                "in a transfer set (rename one, then rerun the build with --overwrite)")
            seen[key] = url


def check_bad_fraction(store: CacheStore, urls: Sequence[str], max_fraction: float) -> None:
    """Over every input shard's completion marker (this run's, earlier runs', other ranks'), so that a rerun
    of a failed build fails again instead of skipping the shards that made it fail."""
    markers = store.completed()
    done = [markers[shard_id_for(u)] for u in urls if shard_id_for(u) in markers]
    bad = sum(m["n_bad"] for m in done)
    read = bad + sum(m["n_samples"] for m in done)
    if read and bad / read > max_fraction:
        first = next(b for m in done for b in m["bad"])
        raise UserError(f"{bad} of {read} samples are bad ({bad / read:.1%} > --max-bad-fraction "
                        f"{max_fraction:.1%}), e.g. {first['key']}: {first['reason']}; see kt-cache info")
