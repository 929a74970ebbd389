"""tools.make_shards fmnist-seg: deterministic composites, masks that follow the pasted garments."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from tools.fmnist_seg import IGNORE, Composer, CompositeSpec, class_names, make_fmnist_seg
from tools.make_shards import main as make_main


def read_tar(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def composer():
    return Composer(CompositeSpec(size=48), seed=3)


def test_cli_writes_images_masks_and_classes(tmp_path):
    out = tmp_path / "seg"
    assert make_main(["fmnist-seg", "--out", str(out), "--train", "12", "--test", "6", "--transfer", "5",
                      "--size", "40", "--seed", "1", "--shard-size", "5"]) == 0
    assert json.loads((out / "train" / "classes.json").read_text()) == class_names()
    assert class_names()[0] == "background" and len(class_names()) == 11
    train = {}
    for shard in sorted((out / "train").glob("*.tar")):
        train.update(read_tar(shard))
    assert len(list((out / "train").glob("*.tar"))) == 3
    assert sorted(train) == sorted(f"train-{i:06d}.{ext}" for i in range(12) for ext in ("png", "mask.png"))
    for i in range(12):
        image, mask = decode(train[f"train-{i:06d}.png"]), decode(train[f"train-{i:06d}.mask.png"])
        assert image.shape == (40, 40, 3) and mask.shape == (40, 40) and mask.dtype == np.uint8
    transfer = read_tar(out / "transfer" / "transfer-000000.tar")
    assert all(name.endswith(".png") and not name.endswith(".mask.png") for name in transfer)  # unlabeled
    assert not (out / "transfer" / "classes.json").exists()
    assert json.loads((out / "test" / "fmnist_seg.json").read_text())["seed"] == 1


def test_same_seed_same_bytes_and_prefix_stable(tmp_path):
    a = make_fmnist_seg(tmp_path / "a", train=8, test=0, spec=CompositeSpec(size=32), seed=5)
    b = make_fmnist_seg(tmp_path / "b", train=4, test=0, spec=CompositeSpec(size=32), seed=5)
    c = make_fmnist_seg(tmp_path / "c", train=4, test=0, spec=CompositeSpec(size=32), seed=6)
    ta, tb, tc = (read_tar(x["train"][0]) for x in (a, b, c))
    assert {k: v for k, v in ta.items() if k < "train-000004"} == tb  # a sample depends on its index, not the run
    assert all(tb[k] != tc[k] for k in tb if k.endswith(".png") and not k.endswith(".mask.png"))


def test_splits_draw_different_composites(composer):
    images = {split: np.asarray(composer.sample(split, 0)[0]) for split in ("train", "test", "transfer")}
    assert not np.array_equal(images["train"], images["test"])
    assert not np.array_equal(images["train"], images["transfer"])


def test_mask_values_and_class_coverage(composer):
    counts = np.zeros(256, np.int64)
    for i in range(150):
        image, mask = composer.sample("train", i)
        assert image.size == mask.size == (48, 48)
        counts += np.bincount(np.asarray(mask).ravel(), minlength=256)
    values = set(np.flatnonzero(counts))
    assert values <= set(range(11)) | {IGNORE}
    assert set(range(11)) <= values  # background and every garment class appear
    assert counts[0] > counts[1:11].max()  # background is the largest class
    assert 0 < counts[IGNORE] < counts[1:11].sum()  # a fringe, not the garments


def test_mask_follows_alpha_of_pasted_garment():
    """A solid full-intensity garment (alpha 1) is one flat colour exactly where the mask names it, with no
    ignored fringe; the split's own garment pool is used (test garments never in train composites)."""
    square = np.full((1, 28, 28), 255, np.uint8)
    pools = {"train": (square, np.array([2])), "test": (square, np.array([7]))}
    composer = Composer(CompositeSpec(size=40, garments=(1, 1), scale=(0.3, 0.5)), seed=0, garments=pools)
    for split, label in (("train", 3), ("test", 8)):
        for i in range(5):
            image, mask = (np.asarray(x) for x in composer.sample(split, i))
            assert set(np.unique(mask)) == {0, label}
            ys, xs = np.nonzero(mask == label)
            side = ys.max() - ys.min() + 1
            assert side == xs.max() - xs.min() + 1 and 12 <= side <= 20 and len(ys) == side * side
            inside = image[mask == label]
            assert (inside == inside[0]).all()  # alpha 1: the tint alone


@pytest.mark.parametrize("args", [["--garments", "0", "2"], ["--scale", "0.5", "0.2"], ["--size", "4"],
                                  ["--train", "-1"]])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args):
    assert make_main(["fmnist-seg", "--out", str(tmp_path / "x"), "--test", "0", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
