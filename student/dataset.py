"""Distill from a kt cache inside your own training loop: the batches `kt-student train` trains on, as a dataset.

    from kt.student.dataset import CacheDataset

    data = CacheDataset("runs/cache.zarr", "data/transfer", image_size=224, mean=mean, std=std,
                        targets=["logits"], batch_size=64, workers=8)
    for epoch in range(epochs):
        data.set_epoch(epoch)
        for batch in data.loader():          # or DataLoader(data, batch_size=None, num_workers=8)
            loss = kl(model(batch["x"]), batch["targets"]["logits"])

A `CacheDataset` is a torch `IterableDataset` over (cache, transfer-set shards) built from the same parts as
`kt-student train`, so it yields exactly the batches that command would train on for the same seed, epoch,
process layout and worker count (a test compares them):

- opening it makes the command's checks (`cache_source`): the cache matches `expect`, holds the targets asked
  for and has completed every shard; every sample of the data is cached, is the image its targets were
  computed on (content digest) and has a key unique in the transfer set;
- the epoch plan is `kt.student.stream`'s: shards shuffled per (seed, epoch) and dealt to processes, groups of
  `shuffle_shards` shards dealt to DataLoader workers and mixed, every process given the same number of
  batches (DDP never waits on a rank that ran out);
- each view is replayed by `ReplayStream` from the parameters stored in the cache (re-checked against a fresh
  draw) at the student's own `image_size`, and the bytes are checked against the cached digest again as they
  are read.

It yields **batches**, not samples: a dict {"x": (B, 3, S, S) float32 normalised views, "targets": {name:
float32 (B, ...)}, "keys": [B sample keys], "views": (B,) view indices, "params": (B, P) view parameters}, plus
"valid" (B, S, S) bool for per-pixel targets (`seg_logits`). The plan is made of batches (equal step counts
across processes, resume by batch index) and targets decode a batch per shard at a time, so batching stays
inside, as webdataset's `.batched()` and open_clip's wds pipeline do: load it with `batch_size=None`
(`loader()` does). A worker's last batch of an epoch may be short.

Rank and world size come from `torch.distributed` when a process group is up (accelerate, Lightning,
torchrun + `init_process_group`), else from torchrun's RANK / WORLD_SIZE, else 0 / 1; pass them to override.
The DataLoader must run exactly `workers` workers (they are part of the plan; another count is refused).
`set_epoch(epoch)` before each epoch, as timm's train.py and Hugging Face's Trainer call it on a dataset
(Lightning: from an `on_train_epoch_start` callback); `set_epoch(epoch, skip=k)` resumes at batch k.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kt.errors import UserError
from kt.shards import BadSamples, expand_shards, iter_samples
from kt.student.stream import (VIEW_POLICIES, ReplayStream, ShardData, StreamSpec, normalize_views, plan_epoch,
                               stream_loader)

# timm's IMAGENET_DEFAULT_MEAN / STD, the normalisation most timm models expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CacheSource:
    """Per input shard: cached keys, stored view parameters, and a per-batch target decoder."""

    def __init__(self, reader, targets: list[str]):
        self.reader, self.targets = reader, targets

    def __call__(self, url: str):
        # views are checked per used (key, view) by the stream, not all V per sample here
        shard = self.reader.shard(url, self.targets, check_views=False)
        codecs = self.reader.codecs

        def targets_fn(rows: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
            # decode only the (row, view) pairs of the batch
            return {t: codecs[t].decode({p: a[rows, views] for p, a in shard.encoded[t].items()})
                    .astype(np.float32, copy=False) for t in self.targets}

        return ShardData(shard.keys, shard.params, shard.digests, targets_fn)


def check_data_matches_cache(reader, urls) -> list[int]:
    """Samples per shard as cached, after checking the data against the cache in one pass over its bytes
    (no decoding): every sample's key must be cached (or a known bad sample), its image must be the one
    the targets were computed on (content digest), and no key may come twice in the transfer set. The
    stream checks the digests again as it reads; this pass fails before training starts, with one line."""
    sizes = []
    seen: dict[str, str] = {}
    for url in urls:
        shard = reader.shard(url, [], check_views=False)
        known = set(shard.keys) | {b["key"] for b in shard.bad}
        extra = []
        for s in iter_samples([url], decode=False, bad=BadSamples(1.0), digest=shard.digests is not None):
            if s.key not in known:
                extra.append(s.key)
            elif s.digest is not None and s.key in shard.rows:
                shard.check_content(s.key, s.digest, url)
        if extra:
            raise UserError(f"{len(extra)} samples of {url} are not in the cache, e.g. {', '.join(extra[:3])}; "
                            "rebuild the cache for this data or pass the shards it was built from")
        for key in shard.keys:
            if key in seen:
                raise UserError(f"duplicate sample key {key!r} in shards {seen[key]} and {url}; keys must be "
                                "unique in a transfer set")
            seen[key] = url
        sizes.append(len(shard.keys))
    return sizes


def cache_source(reader, urls: Sequence[str], targets: Sequence[str], needed_by: str) -> tuple[list[int], CacheSource]:
    """(samples per shard, stream source) of an opened cache over the transfer-set shards `urls`, after every
    check a distillation run makes before it reads a batch: the cache holds `targets` (`needed_by` names who
    needs them in the message), has completed every shard, and the data is what it was built from."""
    missing = [t for t in targets if t not in reader.targets]
    if missing:
        raise UserError(f"{needed_by} needs cached {', '.join(missing)}; the cache holds {', '.join(reader.targets)}")
    reader.require_complete(urls)
    sizes = check_data_matches_cache(reader, urls)
    return sizes, CacheSource(reader, list(targets))


def process_layout(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments where given, else the process group's, else torchrun's environment."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            found = dist.get_rank(), dist.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not a process of a world of {world_size}")
    return int(rank), int(world_size)


class CacheDataset(IterableDataset):
    """The replayed views of a transfer set with their cached teacher targets, in `kt-student train`'s batches.

    Args:
        cache: the teacher cache (`kt-cache build`), a local path or fsspec URL.
        data: the transfer-set shards the cache was built from (a shard spec, as `--data` takes, or a list).
        image_size: the student's input size; every view is rendered at it from its stored parameters.
        mean, std: the student's input normalisation (`timm.data.resolve_data_config({}, model=m)`).
        targets: the cached targets to decode (default: all the cache holds): logits, embedding, patches,
            seg_logits.
        batch_size: samples per batch (per process).
        seed: orders shards and samples per epoch (`kt-student train --seed`).
        workers: DataLoader workers that will read it (part of the plan: `--workers`).
        shuffle_shards: shards a worker reads at once and mixes (`--shuffle-shards`).
        view_policy: which cached view an epoch shows: "cycle" (epoch mod V) or "random" (`--view-policy`).
        rank, world_size: this process and their number (default: `process_layout`).
        expect: what the cache must have been built with, refused otherwise (`CacheReader`'s `expect`: teacher
            fingerprint, classes, view spec).
        uint8: yield "x" as uint8 views and `normalize` them where the model is (a quarter of the bytes through
            worker queues and pinned memory).
        storage_options: fsspec options for a remote cache.
    """

    def __init__(self, cache: str, data: str | Sequence[str], image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, targets: Sequence[str] | None = None, batch_size: int = 64,
                 seed: int = 0, workers: int = 0, shuffle_shards: int = 8, view_policy: str = "cycle",
                 rank: int | None = None, world_size: int | None = None, expect: dict | None = None,
                 uint8: bool = False, storage_options: dict | None = None):
        from kt.teacher_cache.reader import CacheReader

        for name, value, least in (("image_size", image_size, 8), ("batch_size", batch_size, 1),
                                   ("workers", workers, 0), ("shuffle_shards", shuffle_shards, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UserError(f"CacheDataset {name} must be an integer >= {least}, got {value!r}")
        if view_policy not in VIEW_POLICIES:
            raise UserError(f"unknown view_policy {view_policy!r}; choose from {', '.join(VIEW_POLICIES)}")
        rank, world_size = process_layout(rank, world_size)
        urls = expand_shards(data)
        self.reader = CacheReader(cache, expect=expect, storage_options=storage_options)
        self.targets = list(self.reader.targets if targets is None else targets)
        sizes, self.source = cache_source(self.reader, urls, self.targets, f"CacheDataset(targets={self.targets})")
        self.spec = StreamSpec(tuple(urls), tuple(sizes), batch_size, seed, rank, world_size, workers, shuffle_shards)
        if not plan_epoch(self.spec, 0):
            raise UserError("the transfer set is empty (or smaller than one batch per process)")
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.view_policy, self.uint8 = view_policy, uint8
        self.epoch, self.skip = 0, 0

    @property
    def classes(self) -> list[str] | None:
        """The teacher's class names (what its logits index), as the cache records them."""
        return self.reader.classes

    @property
    def num_classes(self) -> int:
        """Outputs of the teacher's task head (0 for a feature-only teacher)."""
        return self.reader.num_classes

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Yield epoch `epoch` from its batch `skip` on (a resumed run skips the batches it had taken)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def __len__(self) -> int:
        """Batches this process yields this epoch (the same on every process)."""
        return max(0, len(plan_epoch(self.spec, self.epoch)) - self.skip)

    def __iter__(self):
        info = get_worker_info()
        running = info.num_workers if info is not None else 0
        if max(1, running) != max(1, self.spec.workers):
            raise UserError(f"this CacheDataset is planned for {self.spec.workers} DataLoader workers and is read by "
                            f"{running}; give the DataLoader num_workers={self.spec.workers} (loader() does)")
        return iter(ReplayStream(self.spec, self.epoch, self.skip, self.source, self.reader.view_set,
                                 self.view_policy, self.image_size, self.mean, self.std,
                                 valid="seg_logits" in self.targets, uint8=self.uint8))

    def loader(self, pin_memory: bool = False) -> DataLoader:
        """The DataLoader that reads it as `kt-student train` does (`workers` workers, `batch_size=None`);
        `pin_memory` when the batches go to a GPU."""
        return stream_loader(self, pin_memory=pin_memory)

    def normalize(self, batch: dict) -> dict:
        """A `uint8` batch, already on its device, with "x" normalised there (other batches are unchanged)."""
        return normalize_views(batch, self.mean, self.std) if self.uint8 else batch

    def __repr__(self) -> str:
        return (f"CacheDataset({self.reader.url!r}, {len(self.spec.urls)} shards, {sum(self.spec.sizes)} samples, "
                f"targets={self.targets}, rank {self.spec.rank}/{self.spec.world_size})")
