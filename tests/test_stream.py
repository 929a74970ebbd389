"""The distillation stream's plan is what a multi-worker DataLoader really yields, and seeking is exact."""

import numpy as np
import pytest
import torch

from kt.student.distill import FreshSource, shard_keys
from kt.student.stream import (ReplayStream, StreamSpec, _rng, plan_epoch, steps_per_epoch, stream_loader,
                               view_index)
from kt.views import VIEW_PRESETS, ViewSet


def make_stream(fmnist, epoch, skip, workers, batch_size=32, rank=0, world=1, shuffle_shards=2):
    """Three 100-image shards; two per group by default, so that two workers both get a group."""
    urls = fmnist["train"]
    keys = shard_keys(urls)
    spec = StreamSpec(tuple(urls), tuple(len(keys[u]) for u in urls), batch_size, seed=3, rank=rank,
                      world_size=world, workers=workers, shuffle_shards=shuffle_shards)
    return spec, ReplayStream(spec, epoch, skip, FreshSource(keys), ViewSet(VIEW_PRESETS["train"], 0, 4), "cycle",
                              24, (0.5,) * 3, (0.5,) * 3), keys


def expected_keys(spec, keys, epoch):
    """Keys per batch from the plan's definition, built independently of the stream's iteration code:
    shards shuffled, dealt to ranks, cut into groups of `shuffle_shards` dealt to workers, each group's
    union permuted, each worker's samples cut into batches taken round-robin."""
    order = _rng("shards", spec.seed, epoch).permutation(len(spec.urls)).tolist()[spec.rank::spec.world_size]
    k, nw = spec.shuffle_shards, max(1, spec.workers)
    groups = [order[i:i + k] for i in range(0, len(order), k)]
    per_worker = {w: [] for w in range(nw)}
    for g, group in enumerate(groups):
        union = [keys[spec.urls[s]][r] for s in group for r in range(spec.sizes[s])]
        perm = _rng("mix", spec.seed, epoch, *group).permutation(len(union))
        per_worker[g % nw] += [union[i] for i in perm]
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


# ------------------------------------------------------------------------------------ mixing shards
CLASSES, PER_CLASS = 4, 60


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory):
    """4 classes x 60 tiny images written class by class in 60-image shards: every shard holds one class."""
    from kt.shards import write_shards

    rng = np.random.default_rng(0)
    samples = [(f"c{c}-{i:03d}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), c)
               for c in range(CLASSES) for i in range(PER_CLASS)]
    from PIL import Image

    urls = write_shards(((k, Image.fromarray(a), c) for k, a, c in samples),
                        tmp_path_factory.mktemp("sorted"), prefix="sorted", maxcount=PER_CLASS)
    return urls, {k: c for k, _, c in samples}


def majority_fraction(batches, label) -> float:
    """Mean, over full batches, of the share of the batch's most common class."""
    fractions = []
    for keys in batches:
        if len(keys) == 16:
            counts = np.bincount([label[k] for k in keys], minlength=CLASSES)
            fractions.append(counts.max() / len(keys))
    return float(np.mean(fractions))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_mix_class_sorted_shards(class_sorted, workers):
    """A transfer set written class by class still gives batches as mixed as a global shuffle's."""
    urls, label = class_sorted
    keys = shard_keys(urls)
    spec = StreamSpec(tuple(urls), tuple(len(keys[u]) for u in urls), 16, seed=0, workers=workers)
    got = []
    for epoch in range(3):
        stream = ReplayStream(spec, epoch, 0, FreshSource(keys), ViewSet(VIEW_PRESETS["train"], 0, 1), "cycle", 8,
                              (0.5,) * 3, (0.5,) * 3)
        got += [b["keys"] for b in stream_loader(stream)]
    everything = sorted(label)
    rng = np.random.default_rng(1)
    reference = []
    for _ in range(200):  # a global shuffle of all samples, cut into batches of 16
        order = rng.permutation(len(everything))
        reference += [[everything[i] for i in order[s:s + 16]] for s in range(0, len(order), 16)]
    assert abs(majority_fraction(got, label) - majority_fraction(reference, label)) <= 0.10


def test_stream_decodes_jpegs_at_the_reduced_scale_its_views_allow(tmp_path, monkeypatch):
    """A 500x375 JPEG rendered at 32 px decodes at 1/2-1/8 scale (`kt.render.decode_for_views`, as the build
    does): the student's views are those of that decode exactly, and of the full decode within 1/255."""
    import kt.student.stream as stream
    from kt.render import decode_for_views, render, to_tensor
    from kt.shards import decode_image, write_shards
    from tools.bench_pipeline import encode, photos_500x375

    jpegs = [encode(img, "JPEG") for img in photos_500x375(12, seed=0)]
    urls = write_shards(({"__key__": f"p{i:03d}", "jpg": b, "cls": b"0"} for i, b in enumerate(jpegs)),
                        tmp_path, prefix="jpeg", maxcount=12)
    keys = shard_keys(urls)
    spec = StreamSpec(tuple(urls), (12,), 12, seed=0, workers=0)
    sizes = []
    real = stream.decode_for_views

    def spy(data, params, size):
        img = real(data, params, size)
        sizes.append(img.size)
        return img

    monkeypatch.setattr(stream, "decode_for_views", spy)
    batch = next(iter(ReplayStream(spec, 0, 0, FreshSource(keys), ViewSet(VIEW_PRESETS["light"], 0, 1), "cycle",
                                   32, (0.5,) * 3, (0.5,) * 3)))
    assert len(sizes) == 12 and any(w < 500 for w, _ in sizes)  # some decodes were reduced
    by_key = dict(zip((f"p{i:03d}" for i in range(12)), jpegs))
    mads = []
    for x, key, params in zip(batch["x"], batch["keys"], batch["params"].numpy()):
        data = by_key[key]
        reduced = to_tensor(render(decode_for_views(data, params, 32), params, 32), (0.5,) * 3, (0.5,) * 3)
        assert torch.equal(x, reduced)
        full = to_tensor(render(decode_image(data), params, 32), (0.5,) * 3, (0.5,) * 3)
        mads.append(float((x - full).abs().mean()) * 0.5 * 255)
    assert max(mads) <= 1.0, mads
