"""The distillation stream: transfer-set shards + cached targets + replayed views -> batches.

Every epoch has a plan that is a pure function of (seed, epoch, shard sizes, processes, workers):

- the input shards are shuffled by (seed, epoch) and dealt to processes and DataLoader workers
  (`kt.shards.split_urls`);
- within a shard, samples are shuffled by (seed, epoch, shard);
- each worker cuts its samples into batches, and the DataLoader takes them round-robin over the workers
  that still have batches (PyTorch's in-order IterableDataset behaviour, which `plan_epoch` mirrors and a
  test checks);
- every process stops after the same number of batches (the smallest over processes), so DDP never
  waits on a rank that ran out.

Resuming at batch k of an epoch is therefore arithmetic: each worker knows how many of its own batches
the first k held and starts after them, without decoding anything it skips. Which view a sample shows in
an epoch is `epoch mod V` ("cycle") or drawn from (seed, epoch, key) ("random"); its parameters are
the stored ones, re-checked against a fresh `sample_params` (a numpy change that moved the views fails
loudly instead of silently pairing targets with other pixels).

Targets come from the cache (`CacheSource` over the reader's `ShardTargets`: decoded per batch, only the rows
and views used) or, for the online-teacher baseline, are left to the training step (`teacher_x` holds the
teacher's view).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kt.errors import UserError
from kt.shards import IMAGE_EXTS, BadSamples, decode_image, iter_samples, split_urls
from kt.views import ViewSpec, check_params, render, sample_params, to_tensor

VIEW_POLICIES = ("cycle", "random")


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


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def shard_order(spec: StreamSpec, epoch: int) -> list[int]:
    return _rng("shards", spec.seed, epoch).permutation(len(spec.urls)).tolist()


def worker_shards(spec: StreamSpec, epoch: int, rank: int, worker: int) -> list[int]:
    """Indices (into spec.urls) of the shards one (rank, worker) reads this epoch, in order."""
    nw = max(1, spec.workers)
    return split_urls(shard_order(spec, epoch), rank, spec.world_size, worker, nw)


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
        counts = [math.ceil(sum(spec.sizes[i] for i in worker_shards(spec, epoch, r, w)) / spec.batch_size)
                  for w in range(nw)]
        return _round_robin(counts)

    steps = min(len(sequence(r)) for r in range(spec.world_size))
    return sequence(spec.rank if rank is None else rank)[:steps]


def steps_per_epoch(spec: StreamSpec) -> int:
    """Batches per epoch on every process (epochs differ by at most a few; the first one sets the schedule)."""
    return len(plan_epoch(spec, 0))


def view_index(policy: str, views: int, seed: int, epoch: int, key: str) -> int:
    if policy == "cycle":
        return epoch % views
    return int(_rng("view", seed, epoch, key).integers(views))


class ReplayStream(IterableDataset):
    """Batches {"x", "keys", "views", "params", targets...} of one epoch, from `skip` on.

    `source(url)` returns, for an input shard, (keys, params (N, V, P) or None, targets_fn) where
    targets_fn(rows, views) decodes the targets of those (row, view) pairs; `params=None` means views
    are sampled fresh (online teacher). `teacher_size`, when set, adds the teacher's rendering of the
    same view as "teacher_x".
    """

    def __init__(self, spec: StreamSpec, epoch: int, skip: int, source, view_spec: ViewSpec, view_seed: int,
                 views: int, policy: str, image_size: int, mean, std, teacher_size: int = 0,
                 teacher_norm: tuple | None = None):
        self.spec, self.epoch, self.skip, self.source = spec, epoch, skip, source
        self.view_spec, self.view_seed, self.views, self.policy = view_spec, view_seed, views, policy
        self.image_size, self.mean, self.std = image_size, mean, std
        self.teacher_size, self.teacher_norm = teacher_size, teacher_norm

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
        first, last = mine[skipped], mine[-1]
        b = self.spec.batch_size
        position = 0  # index of the next sample among this worker's samples this epoch
        buf: list[tuple] = []
        for shard in worker_shards(self.spec, self.epoch, self.spec.rank, worker):
            n = self.spec.sizes[shard]
            if position + n <= first * b:  # wholly before the resume point: not even opened
                position += n
                continue
            if position >= (last + 1) * b:
                break
            yield from self._shard_batches(shard, position, first * b, (last + 1) * b, buf)
            position += n
        if buf:
            yield self._collate(buf)

    def _shard_batches(self, shard: int, position: int, start: int, stop: int, buf: list) -> Iterator[dict]:
        url = self.spec.urls[shard]
        keys, params, targets_fn = self.source(url)
        order = _rng("samples", self.spec.seed, self.epoch, shard).permutation(len(keys))
        wanted = {int(order[i]): position + i for i in range(len(keys)) if start <= position + i < stop}
        if not wanted:
            return
        images = _load_images(url, {keys[r] for r in wanted})
        for i in range(len(keys)):
            if not start <= position + i < stop:
                continue
            row = int(order[i])
            key = keys[row]
            v = view_index(self.policy, self.views, self.view_seed, self.epoch, key)
            if params is None:
                p = sample_params(self.view_spec, self.view_seed, key, v)
            else:
                p = params[row, v]
                check_params(self.view_spec, self.view_seed, key, v, p)
            buf.append((row, v, key, p, images[key], targets_fn))
            if len(buf) == self.spec.batch_size:
                yield self._collate(buf)
                buf.clear()

    def _collate(self, buf: list) -> dict:
        batch = {"x": torch.stack([to_tensor(render(img, p, self.image_size), self.mean, self.std)
                                   for _, _, _, p, img, _ in buf]),
                 "keys": [k for _, _, k, _, _, _ in buf],
                 "views": torch.tensor([v for _, v, _, _, _, _ in buf]),
                 "params": torch.from_numpy(np.stack([p for _, _, _, p, _, _ in buf]))}
        if self.teacher_size:
            mean, std = self.teacher_norm
            batch["teacher_x"] = torch.stack([to_tensor(render(img, p, self.teacher_size), mean, std)
                                              for _, _, _, p, img, _ in buf])
        # targets: group consecutive items by their shard's decoder (a batch may span two shards)
        parts: list[dict[str, torch.Tensor]] = []
        start = 0
        for end in range(1, len(buf) + 1):
            if end == len(buf) or buf[end][5] is not buf[start][5]:
                fn = buf[start][5]
                if fn is not None:
                    rows = np.array([r for r, *_ in buf[start:end]])
                    views = np.array([v for _, v, *_ in buf[start:end]])
                    parts.append({t: torch.from_numpy(a) for t, a in fn(rows, views).items()})
                start = end
        if parts:
            batch["targets"] = {t: torch.cat([p[t] for p in parts]) for t in parts[0]}
        return batch


def _load_images(url: str, keys: set[str]) -> dict:
    """Decoded images of `keys` from one data shard (the other members are read, not decoded)."""
    images = {}
    for s in iter_samples([url], bad=BadSamples(max_fraction=1.0), decode=False, keep_raw=True):
        if s.key in keys:
            ext = next(e for e in IMAGE_EXTS if e in s.raw)
            images[s.key] = decode_image(s.raw[ext])
    missing = sorted(keys - set(images))
    if missing:
        raise UserError(f"{len(missing)} cached samples are missing from data shard {url}, "
                        f"e.g. {', '.join(missing[:3])}; is --data the transfer set the cache was built from?")
    return images


def stream_loader(dataset: ReplayStream, pin_memory: bool = False) -> DataLoader:
    """`pin_memory` when the batches go to a GPU (`kt.device.placement`)."""
    workers = dataset.spec.workers
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
