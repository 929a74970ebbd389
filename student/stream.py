"""The distillation stream: transfer-set shards + cached targets + replayed views -> batches.

Transfer sets are often written class by class, so a batch must mix samples of many shards: reading
one shard at a time gives near single-class batches (skewed BatchNorm statistics, KL gradient and
in-batch negatives). Every epoch has a plan that is a pure function of (seed, epoch, shard sizes,
processes, workers, shuffle_shards):

- the input shards are shuffled by (seed, epoch) and dealt to processes (`kt.shards.split_urls`);
- each process cuts its shard sequence into *groups* of `shuffle_shards` consecutive shards, and deals
  the groups to its DataLoader workers round-robin;
- a worker reads one group at a time and takes its samples in a seeded permutation of the group's union
  (seeded by (seed, epoch, the group's shards)), so each batch draws from up to `shuffle_shards` shards;
- each worker cuts its samples into batches, and the DataLoader takes them round-robin over the workers
  that still have batches (PyTorch's in-order IterableDataset behaviour, which `plan_epoch` mirrors and a
  test checks);
- every process stops after the same number of batches (the smallest over processes), so DDP never
  waits on a rank that ran out.

Memory: a worker holds the encoded image bytes (decoded only when a batch is rendered) and the cached
targets of the group it reads, about `shuffle_shards` shards' worth per worker. Groups go whole to one
worker (rather than every worker reading every shard of a group for its own batches) so that each shard
is read and its targets decompressed once per epoch; the price is that a process with fewer groups than
workers leaves some workers idle, which only happens on small transfer sets.

Resuming at batch k of an epoch is arithmetic: each worker knows how many of its own batches the first k
held and starts after them, without decoding anything it skips (groups wholly before the resume point are
not even opened). Which view a sample shows in an epoch is `epoch mod V` ("cycle") or drawn from (seed,
epoch, key) ("random"); its parameters are the stored ones, re-checked against a fresh `sample_params`
(a numpy change that moved the views fails loudly instead of silently pairing targets with other
pixels). Where the source has content digests (a cache), each image's bytes are checked against the
digest stored at build time: targets are never paired with other pixels under the same key.

Targets come from the cache (`CacheSource` over the reader's `ShardTargets`: decoded per batch, only the rows
and views used) or, for the online-teacher baseline, are left to the training step (`teacher_x` holds the
teacher's view).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kt.errors import UserError
from kt.shards import BadSamples, decode_image, image_ext, iter_samples, split_urls
from kt.render import decode_for_views, normalize, render_valid, render_view, worker_tensor
from kt.render_tensor import images_to_tensors, render_batch
from kt.views import ViewSet, partner_row

VIEW_POLICIES = ("cycle", "random")

#: targets(rows, views) -> {target name: array with one item per (row, view) pair}
TargetsFn = Callable[[np.ndarray, np.ndarray], dict]


class ShardData(NamedTuple):
    """What a source gives the stream for one input shard."""

    keys: list[str]  # the samples, in the order rows index them
    params: np.ndarray | None  # (N, V, P) stored view parameters; None: views sampled from the seed
    digests: np.ndarray | None  # (N,) content digests of the encoded images; None: content not checked
    targets: TargetsFn | None  # per-batch target decoder; None: the training step makes targets


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """Everything that decides the batches of an epoch (and nothing that does not)."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]  # samples per input shard (good samples, as cached)
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    shuffle_shards: int = 8  # shards a worker reads at once and mixes (DistillConfig.shuffle_shards)


@dataclasses.dataclass
class _Item:
    """One sample of a batch being assembled."""

    group_shard: int  # index into spec.urls
    row: int
    view: int
    key: str
    params: np.ndarray
    data: bytes  # encoded image, decoded when the batch is rendered
    targets: TargetsFn | None
    partner: bytes | None = None  # a mixed view's partner (a sample of the same shard): its encoded image
    partner_params: np.ndarray | None = None  # ... and its own parameters for the same view index


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def shard_order(spec: StreamSpec, epoch: int) -> list[int]:
    return _rng("shards", spec.seed, epoch).permutation(len(spec.urls)).tolist()


def rank_groups(spec: StreamSpec, epoch: int, rank: int) -> list[tuple[int, ...]]:
    """The groups of shard indices (into spec.urls) one process reads this epoch, in order."""
    mine = split_urls(shard_order(spec, epoch), rank, spec.world_size)
    k = max(1, spec.shuffle_shards)
    return [tuple(mine[i:i + k]) for i in range(0, len(mine), k)]


def worker_groups(spec: StreamSpec, epoch: int, rank: int, worker: int) -> list[tuple[int, ...]]:
    """The groups one (rank, worker) reads this epoch, in order."""
    return rank_groups(spec, epoch, rank)[worker::max(1, spec.workers)]


def group_order(spec: StreamSpec, epoch: int, group: Sequence[int]) -> list[tuple[int, int]]:
    """(shard, row) of each sample of a group, in the order the stream takes them: a seeded permutation
    of the union of the group's shards (rows numbered shard by shard in group order)."""
    union = [(shard, row) for shard in group for row in range(spec.sizes[shard])]
    order = _rng("mix", spec.seed, epoch, *group).permutation(len(union))
    return [union[i] for i in order]


def _round_robin(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(worker, its batch index) in the order an in-order DataLoader yields them."""
    out, taken = [], [0] * len(counts)
    while any(t < c for t, c in zip(taken, counts)):
        for w, c in enumerate(counts):
            if taken[w] < c:
                out.append((w, taken[w]))
                taken[w] += 1
    return out


def plan_epoch(spec: StreamSpec, epoch: int, rank: int | None = None) -> list[tuple[int, int]]:
    """The (worker, local batch) sequence this rank takes in `epoch`, cut to the common step count."""
    nw = max(1, spec.workers)

    def sequence(r: int) -> list[tuple[int, int]]:
        counts = [math.ceil(sum(spec.sizes[s] for g in worker_groups(spec, epoch, r, w) for s in g)
                            / spec.batch_size) for w in range(nw)]
        return _round_robin(counts)

    steps = min(len(sequence(r)) for r in range(spec.world_size))
    return sequence(spec.rank if rank is None else rank)[:steps]


def batch_sizes(spec: StreamSpec, epoch: int, rank: int | None = None) -> list[int]:
    """Samples in each batch of `plan_epoch` (a worker's last batch holds its remainder)."""
    rank = spec.rank if rank is None else rank
    totals = [sum(spec.sizes[s] for g in worker_groups(spec, epoch, rank, w) for s in g)
              for w in range(max(1, spec.workers))]
    b = spec.batch_size
    return [min(b, totals[w] - i * b) for w, i in plan_epoch(spec, epoch, rank)]


def steps_per_epoch(spec: StreamSpec) -> int:
    """Batches per epoch on every process (epochs differ by at most a few; the first one sets the schedule)."""
    return len(plan_epoch(spec, 0))


def view_index(policy: str, views: int, seed: int, epoch: int, key: str) -> int:
    if policy == "cycle":
        return epoch % views
    return int(_rng("view", seed, epoch, key).integers(views))


class ReplayStream(IterableDataset):
    """Batches {"x", "keys", "views", "params", targets...} of one epoch, from `skip` on.

    `source(url)` returns a `ShardData` for an input shard. `teacher_size`, when set, adds the teacher's
    rendering of the same view as "teacher_x"; `valid` adds the views' validity masks at the student's size
    as "valid" (B, H, W) bool (`kt.render.render_valid`: per-pixel targets leave the fill out).
    With `device_render` the workers only decode: a batch has the decoded images as "sources" (uint8
    (3, H, W) each) instead of "x"/"teacher_x", and `render_sources` renders them where the model is. With
    `uint8` "x" and "teacher_x" are the rendered views' uint8 values, for the consumer to `normalize` on its
    device (a quarter of the bytes through shared and pinned memory, as the build sends them to a GPU).
    """

    def __init__(self, spec: StreamSpec, epoch: int, skip: int, source: Callable[[str], ShardData],
                 view_set: ViewSet, policy: str, image_size: int, mean, std,
                 teacher_size: int = 0, teacher_norm: tuple | None = None, valid: bool = False,
                 device_render: bool = False, uint8: bool = False):
        self.spec, self.epoch, self.skip, self.source = spec, epoch, skip, source
        self.view_set, self.policy = view_set, policy
        self.image_size, self.mean, self.std = image_size, mean, std
        self.teacher_size, self.teacher_norm = teacher_size, teacher_norm
        self.valid, self.device_render, self.uint8 = valid, device_render, uint8

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        plan = plan_epoch(self.spec, self.epoch)
        if self.skip >= len(plan):
            return
        # The DataLoader starts its round-robin at worker 0, the plan's remainder at the worker of batch
        # `skip`; both are cyclic, so rotating which plan worker each DataLoader worker plays aligns them.
        nw = max(1, self.spec.workers)
        worker = ((info.id if info else 0) + plan[self.skip][0]) % nw
        mine = [b for w, b in plan if w == worker]
        skipped = sum(1 for w, _ in plan[: self.skip] if w == worker)
        if len(mine) <= skipped:
            return
        b = self.spec.batch_size
        start, stop = mine[skipped] * b, (mine[-1] + 1) * b  # this worker's sample positions to yield
        position = 0  # index of the next sample among this worker's samples this epoch
        buf: list[_Item] = []
        for group in worker_groups(self.spec, self.epoch, self.spec.rank, worker):
            n = sum(self.spec.sizes[s] for s in group)
            if position + n <= start:  # wholly before the resume point: not even opened
                position += n
                continue
            if position >= stop:
                break
            yield from self._group_batches(group, position, start, stop, buf)
            position += n
        if buf:
            yield self._collate(buf)

    def _group_batches(self, group: tuple[int, ...], position: int, start: int, stop: int,
                       buf: list[_Item]) -> Iterator[dict]:
        order = group_order(self.spec, self.epoch, group)
        # at this point we know which (shard, row) the wanted positions take; read only those shards
        wanted: dict[int, set[int]] = {}
        for i, (shard, row) in enumerate(order):
            if start <= position + i < stop:
                wanted.setdefault(shard, set()).add(row)
        data = {shard: self._shard(shard) for shard in wanted}
        picks = []  # (shard, row, view, params, partner row or None), in the order they are taken
        for i, (shard, row) in enumerate(order):
            if not start <= position + i < stop:
                continue
            d = data[shard]
            v = view_index(self.policy, self.view_set.views, self.view_set.seed, self.epoch, d.keys[row])
            p = self._params(d, row, v)
            partner = partner_row(p, row, len(d.keys)) if self.view_set.spec.mixes else None
            if partner is not None:  # a mixed view reads its partner's image too (a row of the same shard)
                wanted[shard].add(partner)
            picks.append((shard, row, v, p, partner))
        images = {shard: self._images(shard, data[shard], rows) for shard, rows in wanted.items()}
        for shard, row, v, p, partner in picks:
            d = data[shard]
            mate = {} if partner is None else {"partner": images[shard][partner],
                                               "partner_params": self._params(d, partner, v)}
            buf.append(_Item(shard, row, v, d.keys[row], p, images[shard][row], d.targets, **mate))
            if len(buf) == self.spec.batch_size:
                yield self._collate(buf)
                buf.clear()

    def _params(self, d: ShardData, row: int, view: int) -> np.ndarray:
        """The view's parameters: stored ones checked against re-sampling them, or (no cache) sampled."""
        key = d.keys[row]
        if d.params is None:
            return self.view_set.params(key, view)
        p = d.params[row, view]
        self.view_set.check(key, view, p)
        return p

    def _shard(self, shard: int) -> ShardData:
        data = self.source(self.spec.urls[shard])
        if len(data.keys) != self.spec.sizes[shard]:
            raise UserError(f"shard {self.spec.urls[shard]} has {len(data.keys)} samples, the plan "
                            f"{self.spec.sizes[shard]}; did the cache or the data change during the run?")
        return data

    def _images(self, shard: int, data: ShardData, rows: set[int]) -> dict[int, bytes]:
        """Encoded image bytes of `rows` of one data shard, content digests checked where the source has them."""
        url = self.spec.urls[shard]
        row_of = {data.keys[r]: r for r in rows}
        out: dict[int, bytes] = {}
        for s in iter_samples([url], bad=BadSamples(max_fraction=1.0), decode=False, keep_raw=True,
                              digest=data.digests is not None):
            row = row_of.get(s.key)
            if row is None:
                continue
            if s.digest is not None and s.digest != int(data.digests[row]):
                raise UserError(f"sample {s.key} of data shard {url} is not the image the cache was built from "
                                "(content digest differs); pass the transfer set the cache was built from")
            out[row] = s.raw[image_ext(s.raw)]  # a row may be taken twice (a sample and a mixed view's partner)
        missing = sorted(k for k, r in row_of.items() if r not in out)
        if missing:
            raise UserError(f"{len(missing)} cached samples are missing from data shard {url}, "
                            f"e.g. {', '.join(missing[:3])}; is --data the transfer set the cache was built from?")
        return out

    def _collate(self, buf: list[_Item]) -> dict:
        if self.device_render:  # the batched render takes the full image
            images = [decode_image(item.data) for item in buf]
        else:  # a JPEG decodes at the reduced scale its view still allows at the larger of the two sizes
            size = max(self.image_size, self.teacher_size)
            images = [decode_for_views(item.data, item.params, size) for item in buf]
            partners = [None if item.partner is None else decode_for_views(item.partner, item.partner_params, size)
                        for item in buf]
        batch = {"keys": [item.key for item in buf],
                 "views": torch.tensor([item.view for item in buf]),
                 "params": torch.from_numpy(np.stack([item.params for item in buf]))}
        if self.device_render:
            batch["sources"] = images_to_tensors(images, "cpu")
        else:
            def views(size: int, mean, std) -> torch.Tensor:
                return torch.stack([worker_tensor(render_view(img, item.params, size, mate, item.partner_params),
                                                  mean, std, self.uint8)
                                    for img, mate, item in zip(images, partners, buf)])

            batch["x"] = views(self.image_size, self.mean, self.std)
            if self.teacher_size:
                batch["teacher_x"] = views(self.teacher_size, *self.teacher_norm)
        if self.valid:
            batch["valid"] = torch.from_numpy(np.stack([render_valid(item.params, self.image_size) for item in buf]))
        targets = _batch_targets(buf)
        if targets is not None:
            batch["targets"] = targets
        return batch


def normalize_views(batch: dict, mean, std, teacher_norm: tuple | None = None) -> dict:
    """A `uint8` batch, already on its device, with "x" (and "teacher_x") normalised there."""
    batch["x"] = normalize(batch["x"], mean, std)
    if "teacher_x" in batch:
        batch["teacher_x"] = normalize(batch["teacher_x"], *teacher_norm)
    return batch


def render_sources(batch: dict, device, image_size: int, mean, std, teacher_size: int = 0,
                   teacher_norm: tuple | None = None) -> dict:
    """A `device_render` batch as a worker-rendered one: its "sources" rendered on `device` from the batch's
    params (`kt.render_tensor.render_batch`, within 1/255 of the PIL render), "x" at `image_size` and, for an
    online teacher, "teacher_x" at `teacher_size`. Other batches are returned as they are."""
    if "sources" not in batch:
        return batch
    batch = dict(batch)
    sources = [s.to(device, non_blocking=True) for s in batch.pop("sources")]
    params = batch["params"].numpy()
    batch["x"] = render_batch(sources, params, image_size, mean, std)  # never autocast (render_batch sees to it)
    if teacher_size:
        batch["teacher_x"] = render_batch(sources, params, teacher_size, *teacher_norm)
    return batch


def _batch_targets(buf: list[_Item]) -> dict[str, torch.Tensor] | None:
    """Targets of a batch that mixes shards: each shard's rows decoded in one call, put back in batch order."""
    by_shard: dict[int, list[int]] = {}
    for i, item in enumerate(buf):
        if item.targets is not None:
            by_shard.setdefault(item.group_shard, []).append(i)
    if not by_shard:
        return None
    out: dict[str, np.ndarray] = {}
    for positions in by_shard.values():
        fn = buf[positions[0]].targets
        decoded = fn(np.array([buf[i].row for i in positions]), np.array([buf[i].view for i in positions]))
        for name, value in decoded.items():
            if name not in out:
                out[name] = np.empty((len(buf),) + value.shape[1:], value.dtype)
            out[name][positions] = value
    return {name: torch.from_numpy(value) for name, value in out.items()}


def stream_loader(dataset: ReplayStream, pin_memory: bool = False) -> DataLoader:
    """`pin_memory` when the batches go to a GPU (`kt.device.placement`)."""
    workers = dataset.spec.workers
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
