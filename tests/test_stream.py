"""The distillation stream's plan is what a multi-worker DataLoader really yields, and seeking is exact."""

import numpy as np
import pytest
import torch

from kt.student.distill import FreshSource, shard_keys
from kt.student.stream import (ReplayStream, StreamSpec, _rng, plan_epoch, steps_per_epoch, stream_loader,
                            view_index, worker_shards)
from kt.views import VIEW_PRESETS


def make_stream(fmnist, epoch, skip, workers, batch_size=32, rank=0, world=1):
    urls = fmnist["train"]
    keys = shard_keys(urls)
    spec = StreamSpec(tuple(urls), tuple(len(keys[u]) for u in urls), batch_size, seed=3, rank=rank,
                      world_size=world, workers=workers)
    return spec, ReplayStream(spec, epoch, skip, FreshSource(keys), VIEW_PRESETS["train"], 0, 4, "cycle",
                              24, (0.5,) * 3, (0.5,) * 3), keys


def expected_keys(spec, keys, epoch):
    """Keys per batch from the plan alone, built independently of the stream's iteration code."""
    per_worker = {}
    for w in range(max(1, spec.workers)):
        seq = []
        for shard in worker_shards(spec, epoch, spec.rank, w):
            k = keys[spec.urls[shard]]
            order = _rng("samples", spec.seed, epoch, shard).permutation(len(k))
            seq += [k[i] for i in order]
        per_worker[w] = seq
    b = spec.batch_size
    return [per_worker[w][i * b:(i + 1) * b] for w, i in plan_epoch(spec, epoch)]


@pytest.mark.parametrize("workers", [0, 2])
def test_plan_matches_dataloader_order(fmnist, workers):
    spec, stream, keys = make_stream(fmnist, epoch=1, skip=0, workers=workers)
    got = [batch["keys"] for batch in stream_loader(stream)]
    assert got == expected_keys(spec, keys, 1)
    assert len(got) == steps_per_epoch(spec) or workers  # epoch lengths agree
    flat = [k for b in got for k in b]
    assert len(flat) == len(set(flat)) == 300  # every sample once
    assert [len(b) for b in got].count(32) >= len(got) - max(1, workers)


def test_epochs_shuffle_differently(fmnist):
    _, s0, _ = make_stream(fmnist, 0, 0, 0)
    _, s1, _ = make_stream(fmnist, 1, 0, 0)
    a = [k for b in s0 for k in b["keys"]]
    b = [k for b in s1 for k in b["keys"]]
    assert sorted(a) == sorted(b) and a != b


@pytest.mark.parametrize("skip", [1, 4, 7])
def test_seek_equals_reading_and_discarding(fmnist, skip):
    _, full, _ = make_stream(fmnist, 2, 0, workers=2)
    _, seek, _ = make_stream(fmnist, 2, skip, workers=2)
    a = list(stream_loader(full))[skip:]
    b = list(stream_loader(seek))
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["x"], y["x"]) and torch.equal(x["params"], y["params"])


def test_ranks_take_disjoint_samples_and_equal_steps(fmnist):
    seen, steps = [], []
    for rank in range(2):
        spec, stream, _ = make_stream(fmnist, 0, 0, workers=1, rank=rank, world=2)
        batches = list(stream_loader(stream))
        steps.append(len(batches))
        seen += [k for b in batches for k in b["keys"]]
    assert steps[0] == steps[1]
    assert len(seen) == len(set(seen))


def test_view_index_policies():
    assert [view_index("cycle", 4, 0, e, "k") for e in range(6)] == [0, 1, 2, 3, 0, 1]
    r = [view_index("random", 4, 0, e, "k") for e in range(40)]
    assert r == [view_index("random", 4, 0, e, "k") for e in range(40)] and set(r) == {0, 1, 2, 3}
    assert [view_index("random", 4, 0, 3, f"k{i}") for i in range(40)] != [view_index("random", 4, 1, 3, f"k{i}") for i in range(40)]
