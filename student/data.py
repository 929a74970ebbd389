"""Training and evaluation data: labeled subsets in memory, evaluation streams over shards.

Every batch is a pure function of (seed, epoch, position): the epoch's order is a permutation drawn
from (seed, epoch), and each image's view is `kt.views` view `epoch` of (spec, seed, key). Worker
count and process count change nothing, which is what makes resume exact.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from kt.shards import BadSamples, Sample, iter_samples, split_urls
from kt.render import worker_tensor
from kt.views import VIEW_PRESETS, ViewSpec, render, sample_params


class EpochOrder(Sampler):
    """Yields `(index, epoch)` in a permutation drawn from (seed, epoch); `set_epoch` moves it to another epoch
    (accelerate calls it on the samplers of the loaders it prepared), so one loader serves every epoch."""

    def __init__(self, n: int, seed: int, epoch: int = 0, shuffle: bool = True):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        return iter([(int(i), self.epoch) for i in order])

    def __len__(self) -> int:
        return self.n


class LabeledViews(Dataset):
    """In-memory labeled images; item `(i, epoch)` is image i's view `epoch`, rendered and normalised, or with
    `uint8` its uint8 values, for the consumer to `kt.render.normalize` on its device (`kt.render.uint8_views`)."""

    def __init__(self, samples: Sequence[Sample], spec: ViewSpec, seed: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], uint8: bool = False):
        self.samples, self.spec, self.seed = list(samples), spec, seed
        self.image_size, self.mean, self.std, self.uint8 = image_size, mean, std, uint8

    def __len__(self) -> int:
        return len(self.samples)

    def view(self, i: int, epoch: int):
        """Sample i, its view-`epoch` parameters and the rendered image (normalised, or uint8)."""
        s = self.samples[i]
        params = sample_params(self.spec, self.seed, s.key, epoch)
        view = render(s.image, params, self.image_size)
        return s, params, worker_tensor(view, self.mean, self.std, self.uint8)

    def __getitem__(self, item: tuple[int, int]):
        s, _, x = self.view(*item)
        return x, s.label


def labeled_loader(dataset: LabeledViews, epoch: int, batch_size: int, workers: int,
                   shuffle: bool = True, drop_last: bool = True, pin_memory: bool = False) -> DataLoader:
    """One loader for every epoch: its sampler takes the epoch (`EpochOrder.set_epoch`) and its workers persist,
    so a small labeled set (3 batches an epoch) does not start worker processes every epoch, which cost as much
    as the steps (docs/benchmarks.md). `pin_memory` when the batches go to a GPU (`kt.device.placement`).

    The loader draws its workers' base seed from its own generator, not from the global torch RNG: the views are
    pure functions of (seed, key, epoch) and use no worker seed, and a global draw where an iterator is made
    (which a resumed run does at the resume point, an uninterrupted one elsewhere) would shift every dropout mask
    after it (the DeepLabV3 head's, EfficientNet-Lite's) between the two.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochOrder(len(dataset), dataset.seed, epoch, shuffle),
                      num_workers=workers, drop_last=drop_last, persistent_workers=workers > 0,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(dataset.seed))


class EvalStream(IterableDataset):
    """Eval views of every sample in a list of shards: `(image tensor, label, key)`; the image normalised, or with
    `uint8` its uint8 values for the consumer to normalise.

    Shards are split across DataLoader workers (and, when given, processes), so order within a batch
    varies with the worker count; consumers key results by sample key.
    """

    def __init__(self, urls: Sequence[str], image_size: int, mean, std, spec: ViewSpec | None = None,
                 rank: int = 0, world_size: int = 1, uint8: bool = False):
        self.urls, self.image_size, self.mean, self.std = list(urls), image_size, mean, std
        self.spec = spec or VIEW_PRESETS["eval"]
        self.rank, self.world_size, self.uint8 = rank, world_size, uint8

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        bad = BadSamples(max_fraction=1.0)
        for s in iter_samples(split_urls(self.urls, self.rank, self.world_size, wid, nw), bad=bad):
            view = render(s.image, sample_params(self.spec, 0, s.key, 0), self.image_size)
            x = worker_tensor(view, self.mean, self.std, self.uint8)
            yield x, -1 if s.label is None else s.label, s.key


def eval_loader(urls: Sequence[str], image_size: int, mean, std, batch_size: int = 256, workers: int = 2,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False, uint8: bool = False) -> DataLoader:
    workers = min(workers, max(1, len(split_urls(urls, rank, world_size))))
    return DataLoader(EvalStream(urls, image_size, mean, std, rank=rank, world_size=world_size, uint8=uint8),
                      batch_size=batch_size, num_workers=workers, pin_memory=pin_memory)

