"""fmnist-seg: the embedded segmentation task, real Fashion-MNIST garments pasted onto real photographs.

    python -m tools.make_shards fmnist-seg --out data/fmnist-seg --train 2000 --test 500 --transfer 8000 \
        --size 64 --seed 0

No real segmentation set installs offline, so the task is composed from real images: each sample is a seeded
square crop of one of the photographs bundled with scikit-image / scikit-learn (the backgrounds), with 1-3
Fashion-MNIST garments pasted on top. A garment's alpha is its own intensity (Fashion-MNIST garments sit on
a black ground, so intensity is coverage), its colour a random tint shaded by the same intensity, so texture
and silhouette come from the real garment. 11 classes: background, then the 10 Fashion-MNIST classes.

Masks (`<key>.mask.png`, 8-bit class index) follow the alpha: a pixel belongs to the topmost garment whose
alpha there reaches `fringe[1]`, to the background where every garment's alpha is below `fringe[0]`, and is
255 (ignored by training and mIoU) in between: the soft edge of a pasted garment has no single right class.

Splits: `train/` and `test/` (with masks) take garments from Fashion-MNIST's train and test files
respectively, so no test garment was seen in training; `transfer/` (the task-related transfer set: unlabeled
composites, no masks) takes train garments under its own random stream. Every sample is a pure function of
(spec, seed, split, index): its generator is keyed by those numbers, never by the order of generation, so
any prefix of a larger set is the smaller set and the same seed gives the same bytes on every machine.
"""

from __future__ import annotations

import colorsys
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kt.errors import UserError
from kt.shards import check_no_shards, encode_image, write_shards

BACKGROUND = "background"
IGNORE = 255
# the split's number keys its random stream, so train/test/transfer never share composites under one seed
SPLITS = {"train": 0, "test": 1, "transfer": 2}
# which Fashion-MNIST file a split's garments come from: test garments stay unseen in training
GARMENT_SOURCE = {"train": "train", "test": "test", "transfer": "train"}


@dataclass(frozen=True)
class CompositeSpec:
    """How a composite is drawn; stored as `fmnist_seg.json` beside the shards."""

    size: int = 64  # output side in px: the demo's student input size
    garments: tuple[int, int] = (1, 3)  # garments per image, inclusive range
    scale: tuple[float, float] = (0.35, 0.65)  # garment side / image side: large enough to cover a few student cells
    alpha_gain: float = 2.0  # alpha = min(1, gain * intensity / 255): mid-grey fabric is opaque, the black ground clear
    fringe: tuple[float, float] = (0.15, 0.5)  # alpha below lo: background; lo..hi: ignore (255); >= hi: garment
    crop: tuple[float, float] = (0.1, 0.6)  # background crop side / photo's shorter side (as the photos maker)

    def __post_init__(self):
        if self.size < 8:
            raise UserError(f"--size must be >= 8, got {self.size}")
        lo, hi = self.garments
        if not 1 <= lo <= hi:
            raise UserError(f"--garments must be 1 <= MIN <= MAX, got {lo} {hi}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"--scale must be 0 < MIN <= MAX <= 1, got {lo} {hi}")
        lo, hi = self.fringe
        if not 0 < lo <= hi <= 1:
            raise UserError(f"fringe must be 0 < lo <= hi <= 1, got {lo} {hi}")


def class_names() -> list[str]:
    from tools.make_shards import FASHION_MNIST_CLASSES

    return [BACKGROUND, *FASHION_MNIST_CLASSES]


@functools.lru_cache(maxsize=1)
def backgrounds() -> tuple[np.ndarray, ...]:
    """The bundled photographs as RGB arrays, loaded once per process (decoding them takes about a second)."""
    from tools.make_shards import bundled_photos

    return tuple(np.stack([a] * 3, axis=-1) if a.ndim == 2 else a for _, a in bundled_photos())


@functools.lru_cache(maxsize=2)
def garment_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels of one idx split, loaded once per process."""
    from tools.make_shards import load_fashion_mnist

    return load_fashion_mnist(split)


class Composer:
    """Draws composites from the photographs and the garment pools (Fashion-MNIST's, or given ones)."""

    def __init__(self, spec: CompositeSpec, seed: int, garments: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.spec, self.seed = spec, seed
        self.photos = backgrounds()
        if garments is None:
            garments = {name: garment_pool(name) for name in sorted(set(GARMENT_SOURCE.values()))}
        self.garments = garments

    def sample(self, split: str, index: int) -> tuple[Image.Image, Image.Image]:
        """Image (RGB) and mask (L, class index) of composite `index` of `split`."""
        spec, size = self.spec, self.spec.size
        rng = np.random.default_rng([self.seed, SPLITS[split], index])
        photo = self.photos[int(rng.integers(len(self.photos)))]
        h, w = photo.shape[:2]
        side = max(8, int(min(h, w) * rng.uniform(*spec.crop)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        bg = Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side])).resize((size, size), Image.BICUBIC)
        out = np.asarray(bg, dtype=np.float32)
        mask = np.zeros((size, size), np.uint8)
        images, labels = self.garments[GARMENT_SOURCE[split]]
        lo, hi = spec.fringe
        for _ in range(int(rng.integers(spec.garments[0], spec.garments[1] + 1))):
            g = int(rng.integers(len(images)))
            gside = max(4, int(round(size * rng.uniform(*spec.scale))))
            gy, gx = int(rng.integers(0, size - gside + 1)), int(rng.integers(0, size - gside + 1))
            tint = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.5, 1.0)),
                            np.float32) * 255
            level = np.asarray(Image.fromarray(images[g]).resize((gside, gside), Image.BILINEAR), np.float32) / 255
            alpha = np.minimum(1.0, spec.alpha_gain * level)[..., None]
            colour = tint * (0.35 + 0.65 * level[..., None])  # shading keeps the garment's own texture
            region = out[gy:gy + gside, gx:gx + gside]
            region[:] = alpha * colour + (1 - alpha) * region
            a, m = alpha[..., 0], mask[gy:gy + gside, gx:gx + gside]
            m[(a >= lo) & (a < hi)] = IGNORE  # a soft edge over anything: no single right class
            m[a >= hi] = int(labels[g]) + 1
        return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)), Image.fromarray(mask)


def make_fmnist_seg(out: Path, train: int, test: int, transfer: int = 0, spec: CompositeSpec = CompositeSpec(),
                    seed: int = 0, shard_size: int = 1000,
                    garments: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, list[str]]:
    """Write `out/train`, `out/test` (image + mask) and `out/transfer` (image only); returns the shard paths."""
    for name, n in (("--train", train), ("--test", test), ("--transfer", transfer), ("--shard-size", shard_size),
                    ("--seed", seed)):
        if n < 0 or (name == "--shard-size" and n == 0):
            raise UserError(f"{name} must be {'>= 1' if name == '--shard-size' else '>= 0'}, got {n}")
    if train == test == transfer == 0:
        raise UserError("--train, --test and --transfer are all 0: nothing to write")
    # every split, also one this run skips: one --out is one composite set, and a split an earlier run left
    # (another seed or spec) would pass for part of it
    for split in SPLITS:
        check_no_shards(out / split, split)
    composer = Composer(spec, seed, garments)
    classes = class_names()
    written = {}
    for split, count in (("train", train), ("test", test), ("transfer", transfer)):
        if count == 0:
            continue

        def samples(split=split, count=count):
            for i in range(count):
                image, mask = composer.sample(split, i)
                record = {"__key__": f"{split}-{i:06d}", "png": encode_image(image)}
                if split != "transfer":  # the transfer set is unlabeled by definition
                    record["mask.png"] = encode_image(mask)
                yield record

        written[split] = write_shards(samples(), out / split, prefix=split, maxcount=shard_size,
                                      classes=None if split == "transfer" else classes)
        (out / split / "fmnist_seg.json").write_text(json.dumps({"seed": seed, "split": split, "count": count,
                                                                 **asdict(spec)}))
    return written
