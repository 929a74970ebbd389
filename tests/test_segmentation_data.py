"""Labeled segmentation data: masks in shards, N-image subsets, image/mask alignment, mIoU, the ADE20K maker."""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image

from kt.errors import UserError

# class colours of the synthetic task: a pixel's colour says its class (grey, the render fill, is none of them)
PALETTE = np.array([[0, 0, 255], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)


def synthetic(key: str, size=(48, 40), classes: int = 3) -> tuple[Image.Image, np.ndarray]:
    """An image whose pixel colours encode its mask: rectangles and a disc of classes 1.. on class 0."""
    w, h = size
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    mask = np.zeros((h, w), dtype=np.uint8)
    for c in range(1, classes):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        mask[y0:y0 + rng.integers(8, h // 2 + 8), x0:x0 + rng.integers(8, w // 2 + 8)] = c
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(4, 9)
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = classes - 1
    return Image.fromarray(PALETTE[mask]), mask


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_seg_shards(out, n: int = 16, classes: int = 3, prefix: str = "seg", maxcount: int = 8, edit=None):
    """Tiny mask shards (`<key>.png` + `<key>.mask.png`) with classes.json; `edit(i, record)` may spoil one."""
    from kt.shards import write_shards

    records = []
    for i in range(n):
        key = f"{prefix}-{i:04d}"
        image, mask = synthetic(key, classes=classes)
        record = {"__key__": key, "png": png(np.asarray(image)), "mask.png": png(mask)}
        if edit is not None:
            edit(i, record)
        records.append(record)
    names = ["background", "red", "green", "blue", "cyan"][:classes]
    return write_shards(records, out, prefix=prefix, maxcount=maxcount, classes=names)


# ------------------------------------------------------------------------------------------ shards
def test_masks_are_read_only_when_asked(tmp_path):
    from kt.shards import iter_samples

    urls = write_seg_shards(tmp_path / "d", n=4)
    plain = list(iter_samples(urls))
    assert all(s.mask is None for s in plain)
    with_masks = list(iter_samples(urls, mask_classes=3))
    for s in with_masks:
        _, mask = synthetic(s.key)
        assert s.mask.mode == "L" and s.mask.size == s.image.size
        assert (np.asarray(s.mask) == mask).all()


def test_sixteen_bit_masks_above_255_classes(tmp_path):
    from kt.masks import ignore_label
    from kt.shards import iter_samples, write_shards

    mask = np.full((8, 8), 300, dtype=np.uint16)
    mask[0, 0] = 65535  # ignore in a 16-bit mask
    urls = write_shards([{"__key__": "a", "png": png(np.zeros((8, 8, 3), np.uint8)), "mask.png": png(mask)}],
                        tmp_path / "d", classes=[str(i) for i in range(400)])
    (s,) = iter_samples(urls, mask_classes=400)
    assert ignore_label(400) == 65535 and ignore_label(255) == 255
    assert s.mask.mode == "I" and (np.asarray(s.mask) == mask.astype(np.int32)).all()


def test_missing_or_misfit_masks_are_bad_samples_and_labels_beyond_k_are_refused(tmp_path):
    from kt.shards import BadSamples, iter_samples

    def spoil(i, record):
        if i == 1:
            del record["mask.png"]
        if i == 2:
            record["mask.png"] = png(np.zeros((8, 8), np.uint8))

    urls = write_seg_shards(tmp_path / "d", n=6, edit=spoil)
    bad = BadSamples(max_fraction=0.5)
    keys = [s.key for s in iter_samples(urls, bad=bad, mask_classes=3)]
    assert keys == ["seg-0000", "seg-0003", "seg-0004", "seg-0005"]
    reasons = {b["key"]: b["reason"] for b in bad.bad}
    assert "no mask" in reasons["seg-0001"] and "8x8" in reasons["seg-0002"]
    bad.check()  # 2 of 6 is under one half
    with pytest.raises(UserError, match="2 of 6 samples are bad"):
        bad.max_fraction = 0.1
        bad.check()

    def label_5(i, record):
        if i == 3:
            mask = synthetic(record["__key__"])[1]
            mask[0, 0] = 5
            record["mask.png"] = png(mask)

    urls = write_seg_shards(tmp_path / "e", n=6, edit=label_5)
    with pytest.raises(UserError, match="seg-0003.*label 5.*3 classes"):
        list(iter_samples(urls, bad=BadSamples(1.0), mask_classes=3))


def test_labeled_images_are_the_smallest_ranks_and_nested(tmp_path):
    from kt.shards import labeled_images, subset_rank

    urls = write_seg_shards(tmp_path / "d", n=20, maxcount=6)
    keys = [f"seg-{i:04d}" for i in range(20)]
    for n in (3, 7):
        got = labeled_images(urls, n, seed=4, mask_classes=3)
        assert [s.key for s in got] == sorted(sorted(keys, key=lambda k: int(subset_rank(4, k), 16))[:n])
        assert all(s.mask is not None and s.image is not None for s in got)
    small = {s.key for s in labeled_images(urls, 3, 4, mask_classes=3)}
    assert small <= {s.key for s in labeled_images(urls, 7, 4, mask_classes=3)}
    assert small != {s.key for s in labeled_images(urls, 3, 5, mask_classes=3)}
    assert len(labeled_images(urls, None, 0, mask_classes=3)) == 20
    with pytest.raises(UserError, match="--labeled-images 30"):
        labeled_images(urls, 30, 0, mask_classes=3)


# ----------------------------------------------------------------------------------- alignment
def test_image_and_mask_views_stay_aligned():
    """Render image and mask with the same train-view params (crop, flip, rotate, shear, translate): the
    class read back from each image pixel's colour equals the mask's, except on class boundaries."""
    from kt.render import render, render_mask
    from kt.views import _OPS_START, RANDAUG_OPS, VIEW_PRESETS, sample_params

    spec = VIEW_PRESETS["train"]
    checked = ignored = 0
    for v, (op1, a1, op2, a2) in enumerate([("Rotate", 25.0, "ShearX", 0.2), ("TranslateY", -0.2, "Rotate", -15.0),
                                            ("ShearY", -0.25, "TranslateX", 0.15), ("Identity", 0.0, "Rotate", 10.)]):
        image, mask = synthetic(f"k{v}")
        p = sample_params(spec, 0, f"k{v}", v)
        p[5:8] = 1.0  # no colour jitter: colours must keep encoding classes
        p[_OPS_START:_OPS_START + 4] = (RANDAUG_OPS.index(op1), a1, RANDAUG_OPS.index(op2), a2)
        for size in (32, (40, 24)):
            x = np.asarray(render(image, p, size)).astype(int)
            m = np.asarray(render_mask(Image.fromarray(mask), p, size)).astype(int)
            colour_class = np.argmin(((x[:, :, None, :] - PALETTE[None, None].astype(int)) ** 2).sum(-1), -1)
            pad = np.pad(m, 1, mode="edge")
            windows = np.stack([pad[dy:dy + m.shape[0], dx:dx + m.shape[1]] for dy in range(3) for dx in range(3)])
            interior = (windows == m).all(0) & (m != 255)
            assert (colour_class[interior] == m[interior]).all()
            checked += int(interior.sum())
            ignored += int((m == 255).sum())
    assert checked > 2000 and ignored > 50  # the geometric ops did bring in fill pixels


# ----------------------------------------------------------------------------------------- metrics
def test_miou_from_one_confusion_matrix_by_hand():
    from kt.student.segmentation import accumulate_confusion, segmentation_metrics

    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 3], [0, 0, 0, 3]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 3], [2, 0, 0, 0]])
    confusion = np.zeros((4, 4), np.int64)
    accumulate_confusion(confusion, pred, gt, ignore=255)
    expected = np.zeros((4, 4), np.int64)  # rows: truth, columns: prediction
    expected[0] = [4, 1, 1, 0]
    expected[1] = [1, 2, 0, 0]
    expected[3] = [1, 0, 0, 1]
    assert (confusion == expected).all()
    m = segmentation_metrics(confusion, ["bg", "a", "b", "c"])
    # IoU = TP / (TP + FP + FN); class b never appears in the truth: null, left out of the mean
    iou = {"bg": 4 / (6 + 6 - 4), "a": 2 / (3 + 3 - 2), "b": None, "c": 1 / (2 + 1 - 1)}
    assert m["per_class_iou"] == pytest.approx(iou)
    assert m["miou"] == pytest.approx((iou["bg"] + iou["a"] + iou["c"]) / 3)
    assert m["pixel_accuracy"] == pytest.approx(7 / 11) and m["pixels"] == 11


def test_aggregate_runs_gives_miou_mean_and_std():
    from kt.student.evaluate import aggregate

    agg = aggregate([{"miou": 0.5, "pixel_accuracy": 0.8}, {"miou": 0.7, "pixel_accuracy": 0.9}])
    assert agg["runs"] == 2 and agg["miou_mean"] == pytest.approx(0.6)
    assert agg["miou_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1)) and agg["miou"] == [0.5, 0.7]


# ---------------------------------------------------------------------------------------- ADE20K
def test_make_shards_ade20k_on_a_tiny_tree(tmp_path):
    from kt.shards import expand_shards, iter_samples, load_classes
    from tools.make_shards import ADE20K_CLASSES, main

    root = tmp_path / "ADEChallengeData2016"
    masks = {}
    for split, prefix, n in (("training", "ADE_train", 3), ("validation", "ADE_val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            stem = f"{prefix}_{i + 1:08d}"
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / "images" / split / f"{stem}.jpg")
            ann = rng.integers(0, 151, (12, 16)).astype(np.uint8)
            ann[0, :4] = (0, 1, 150, 75)
            Image.fromarray(ann).save(root / "annotations" / split / f"{stem}.png")
            masks[stem] = ann
    assert main(["ade20k", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    for split, n in (("train", 3), ("test", 2)):
        urls = expand_shards(str(tmp_path / "out" / split))
        assert load_classes(urls) == ADE20K_CLASSES
        samples = list(iter_samples(urls, mask_classes=150))
        assert len(samples) == n
        for s in samples:
            want = masks[s.key].astype(int) - 1
            want[want < 0] = 255
            got = np.asarray(s.mask)
            assert (got == want).all() and tuple(got[0, :4]) == (255, 0, 149, 74)
    # objectInfo150.csv, when the tree has it, names the classes
    (root / "objectInfo150.csv").write_text("Idx,Ratio,Train,Val,Name\n" + "".join(
        f"{i},0.01,10,1,name{i};other\n" for i in range(1, 151)))
    assert main(["ade20k", "--root", str(root), "--out", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "train" / "classes.json").read_text())[:2] == ["name1", "name2"]
