"""Make webdataset shards: the embedded Fashion-MNIST default, or any ImageFolder tree.

    python -m tools.make_shards fashion-mnist --out data/fashion-mnist          # train/ and test/ shards
    python -m tools.make_shards imagefolder --root PATH --out data/mine --shard-size 5000
    python -m tools.make_shards photos --out data/photos --count 20000    # generic transfer set
    python -m tools.make_shards fmnist-seg --out data/fmnist-seg --train 2000 --test 500 --size 64  # segmentation
    python -m tools.make_shards ade20k --root PATH/ADEChallengeData2016 --out data/ade20k   # segmentation
    python -m tools.make_shards subset --data data/fashion-mnist/train --labels-per-class 50 --subset-seed 0 1 2 \
        --out data/fashion-mnist-labeled        # the labeled images a grid's finetunes take, and no others

`photos` is the stand-in for a generic web transfer set (CC3M in the paper): seeded random square crops
of the real photographs bundled with scikit-image and scikit-learn, resized to 64 px. `fmnist-seg` is the
embedded segmentation task (garments pasted on those photos, with masks): tools/fmnist_seg.py says how.

Keys are stable and unique: Fashion-MNIST `train-00042` (split and index in the idx file); ImageFolder
`<class>/<file stem>` made filesystem-safe, with a short hash of the file name appended where two files
would otherwise share a key (`a b.png` and `a_b.png`; `x.jpg` and `x.png`, which webdataset would merge
into one sample). Each output folder gets a `classes.json`.

Order: ImageFolder shards are written in a seeded shuffled order by default (`--seed`; `--no-shuffle`
keeps the class-by-class order), as webdataset practice recommends: readers mix only the few shards they
hold open, so a class-sorted set gives class-skewed batches wherever a reader mixes less. Fashion-MNIST
keeps the published order of its idx files, which is already class-mixed (and keeps shards, hence caches
built on them, the same as before); photo crops are random by construction.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from kt.errors import UserError, cli_entry
from kt.shards import IMAGE_EXTS, check_no_shards, encode_image, write_shards
from tools.fmnist_seg import CompositeSpec, make_fmnist_seg

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def check_min(flag: str, value: int | None, low: int) -> None:
    """Refuse a count, size or seed below `low` in one line, before anything is written: below it numpy
    raises a traceback, or the maker "succeeds" writing empty shards (`--shard-size 0`, `--count 0`)."""
    if value is not None and value < low:
        raise UserError(f"{flag} must be >= {low}, got {value}")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: big-endian dims after a magic number) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, _, dtype, ndim = struct.unpack(">BBBB", data[:4])
    if dtype != 0x08:
        raise UserError(f"{path}: only uint8 idx files are supported")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FASHION_MNIST_FILES[split]
    if not (root / images_file).exists():
        raise UserError(f"Fashion-MNIST not found in {root} (apt-get install dataset-fashion-mnist)")
    return read_idx(root / images_file), read_idx(root / labels_file)


def make_fashion_mnist(out: Path, shard_size: int = 2000, root: Path = FASHION_MNIST_DIR,
                       limit: int | None = None, splits: tuple[str, ...] = ("train", "test")) -> dict[str, list[str]]:
    check_min("--shard-size", shard_size, 1)
    check_min("--limit", limit, 1)
    for split in splits:  # every split before the first is written: a refusal leaves nothing half made
        check_no_shards(out / split, split)
    written = {}
    for split in splits:
        images, labels = load_fashion_mnist(split, root)
        n = len(images) if limit is None else min(limit, len(images))
        samples = ((f"{split}-{i:05d}", Image.fromarray(images[i], mode="L"), int(labels[i])) for i in range(n))
        written[split] = write_shards(samples, out / split, prefix=split, maxcount=shard_size,
                                      classes=FASHION_MNIST_CLASSES)
    return written


PHOTO_NAMES = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
               "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
               "rocket", "text", "microaneurysms", "shepp_logan_phantom")


def bundled_photos() -> list[tuple[str, np.ndarray]]:
    """The real photographs shipped with scikit-image and scikit-learn (RGB or grey uint8 arrays)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in PHOTO_NAMES:
        try:
            photos.append((name, np.asarray(getattr(skimage.data, name)())))
        except (AttributeError, ModuleNotFoundError, OSError):  # a data file this skimage build lacks
            continue
    for name, image in zip(("china", "flower"), load_sample_images().images):
        photos.append((name, image))
    out = []
    for name, a in photos:
        if a.dtype != np.uint8:
            a = a.astype(np.float64)
            a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 4:
            a = a[..., :3]
        out.append((name, a))
    return out


def make_photo_crops(out: Path, count: int, size: int = 64, seed: int = 0, shard_size: int = 2000) -> list[str]:
    """`count` seeded random square crops (10%-60% of the shorter side) of the bundled photographs."""
    check_min("--count", count, 1)
    check_min("--size", size, 8)  # kt's smallest model input (kt-retrieve embed --image-size, fmnist-seg --size)
    check_min("--seed", seed, 0)
    check_min("--shard-size", shard_size, 1)
    check_no_shards(out, "photos")
    photos = bundled_photos()
    rng = np.random.default_rng(seed)

    def samples():
        for i in range(count):
            name, a = photos[int(rng.integers(len(photos)))]
            h, w = a.shape[:2]
            side = max(8, int(min(h, w) * rng.uniform(0.1, 0.6)))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(a[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
            yield f"photo-{i:06d}-{name}", crop, None

    return write_shards(samples(), out, prefix="photos", maxcount=shard_size)


def make_subset(data: str, out: Path, labels_per_class: int, seeds: list[int], shard_size: int = 2000) -> list[str]:
    """The union over `seeds` of the labeled subsets `kt-student finetune --labels-per-class N --subset-seed S`
    takes from `data`, with their original bytes, in (label, key) order, and `data`'s classes.json.

    A subset is the N images of smallest blake2b(seed, key) in each class, and a smaller N's images are among a
    larger one's: every finetune of N or fewer per class with one of these seeds takes, from the output, exactly
    the images it takes from `data`, without reading all of `data` per run (a 10 s scan of Fashion-MNIST's
    60,000 on 2 cores). Retrieval embeds one seed's subset as its queries."""
    from kt.shards import expand_shards, labeled_subset, load_classes

    check_min("--labels-per-class", labels_per_class, 1)
    check_min("--shard-size", shard_size, 1)
    for seed in seeds:
        check_min("--subset-seed", seed, 0)
    check_no_shards(out, "labeled")
    urls = expand_shards(data)
    classes = load_classes(urls)
    union = {}
    for seed in seeds:
        union.update((s.key, s) for s in labeled_subset(urls, labels_per_class, seed,
                                                        num_classes=len(classes) if classes else None))
    ordered = sorted(union.values(), key=lambda s: (s.label, s.key))
    return write_shards(ordered, out, prefix="labeled", maxcount=shard_size, classes=classes)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def imagefolder_entries(root: Path, classes: list[str]) -> list[tuple[str, Path, int]]:
    """(key, file, label) of every image under root/<class>/, keys unique (see the module docstring)."""
    entries = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTS:
                entries.append((f"{_safe(name)}/{_safe(f.stem)}", f, label))
    count = Counter(key for key, _, _ in entries)
    # a key two files would share gets a hash of the file's own relative path: stable, and still readable
    entries = [(key if count[key] == 1 else f"{key}-{_path_hash(f.relative_to(root))}", f, label)
               for key, f, label in entries]
    seen: dict[str, Path] = {}
    for key, f, _ in entries:
        if key in seen:  # only if a hashed key meets a literal one of the same text
            raise UserError(f"files {seen[key]} and {f} map to one sample key {key!r}; rename one of them")
        seen[key] = f
    return entries


def _path_hash(path: Path) -> str:
    return hashlib.blake2b(path.as_posix().encode(), digest_size=4).hexdigest()


def make_imagefolder(root: Path, out: Path, shard_size: int = 5000, prefix: str = "shard",
                     shuffle: bool = True, seed: int = 0) -> list[str]:
    check_min("--shard-size", shard_size, 1)
    check_min("--seed", seed, 0)
    if not root.is_dir():
        raise UserError(f"not a directory: {root}")
    check_no_shards(out, prefix)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root} has no class subdirectories")
    entries = imagefolder_entries(root, classes)
    if shuffle:
        entries = [entries[i] for i in np.random.default_rng(seed).permutation(len(entries))]

    def samples():
        for key, f, label in entries:
            ext = f.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            yield {"__key__": key, ext: f.read_bytes(), "cls": str(label).encode()}

    return write_shards(samples(), out, prefix=prefix, maxcount=shard_size, classes=classes)


# ADE20K (SceneParsing, ADEChallengeData2016): the 150 classes in annotation order 1..150, first name of each,
# as objectInfo150.csv lists them (and mmsegmentation's ADE20KDataset): the fallback for a tree without the csv.
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
ADE20K_SPLITS = {"training": "train", "validation": "test"}


def ade20k_classes(root: Path) -> list[str]:
    """The class names from the tree's objectInfo150.csv (Idx,Ratio,Train,Val,Name; the first of the
    `;`-separated names), else `ADE20K_CLASSES`."""
    import csv

    path = root / "objectInfo150.csv"
    if not path.exists():
        return list(ADE20K_CLASSES)
    with open(path, newline="") as f:
        rows = sorted((int(r["Idx"]), r["Name"].split(";")[0].strip()) for r in csv.DictReader(f))
    if [i for i, _ in rows] != list(range(1, 151)):
        raise UserError(f"{path}: expected class indices 1..150")
    return [name for _, name in rows]


def make_ade20k(root: Path, out: Path, shard_size: int = 1000) -> dict[str, list[str]]:
    """ADEChallengeData2016 -> OUT/train (training) and OUT/test (validation) mask shards.

    Annotation 0 ("other", unlabeled) becomes the ignore label 255 and 1..150 become classes 0..149, as
    mmsegmentation's `reduce_zero_label` does. Images keep their JPEG bytes; keys are the file stems
    (`ADE_train_00000001`, unique). Samples go in file-name order: ADE20K's numbering is not grouped by
    class, so there is nothing to shuffle away.
    """
    check_min("--shard-size", shard_size, 1)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    if not (root / "images").is_dir() or not (root / "annotations").is_dir():
        raise UserError(f"{root} is not an ADEChallengeData2016 tree (images/ and annotations/ expected)")
    for name in ADE20K_SPLITS.values():
        check_no_shards(out / name, name)
    classes = ade20k_classes(root)
    written = {}
    for split, name in ADE20K_SPLITS.items():
        images = sorted((root / "images" / split).glob("*.jpg"))
        if not images:
            raise UserError(f"no images in {root / 'images' / split}")

        def samples(images=images, split=split):
            for image in images:
                ann = root / "annotations" / split / (image.stem + ".png")
                if not ann.exists():
                    raise UserError(f"{image.name} has no annotation {ann}")
                labels = np.asarray(Image.open(ann))
                if labels.ndim != 2 or labels.max(initial=0) > 150:
                    raise UserError(f"{ann}: not an ADE20K annotation (one channel, values 0..150)")
                mask = (labels.astype(np.int16) - 1).astype(np.uint8)  # 0 -> -1 -> 255 (ignore)
                yield {"__key__": image.stem, "jpg": image.read_bytes(), "mask.png": encode_image(Image.fromarray(mask))}

        written[name] = write_shards(samples(), out / name, prefix=name, maxcount=shard_size, classes=classes)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    f = sub.add_parser("fashion-mnist", help="Fashion-MNIST idx files -> train/ and test/ shards")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--root", type=Path, default=FASHION_MNIST_DIR)
    f.add_argument("--shard-size", type=int, default=2000)
    f.add_argument("--limit", type=int, default=None, help="first N images per split (tests)")
    i = sub.add_parser("imagefolder", help="ROOT/<class>/<image> -> shards")
    i.add_argument("--root", type=Path, required=True)
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--shard-size", type=int, default=5000)
    i.add_argument("--prefix", default="shard")
    i.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="write samples in a seeded shuffled order (default); --no-shuffle keeps class order")
    i.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    g = sub.add_parser("photos", help="generic transfer set: seeded crops of the bundled photographs")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--count", type=int, default=20000)
    g.add_argument("--size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--shard-size", type=int, default=2000)
    s = sub.add_parser("fmnist-seg", help="segmentation task: Fashion-MNIST garments on photo crops, with masks")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--train", type=int, default=2000, help="labeled composites (train garments)")
    s.add_argument("--test", type=int, default=500, help="labeled composites (test garments, unseen in train)")
    s.add_argument("--transfer", type=int, default=0, help="unlabeled composites (task-related transfer set)")
    s.add_argument("--size", type=int, default=CompositeSpec.size, help="image side in px")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--garments", type=int, nargs=2, default=CompositeSpec.garments, metavar=("MIN", "MAX"),
                   help="garments per image")
    s.add_argument("--scale", type=float, nargs=2, default=CompositeSpec.scale, metavar=("MIN", "MAX"),
                   help="garment side / image side")
    s.add_argument("--shard-size", type=int, default=1000)
    a = sub.add_parser("ade20k", help="ADEChallengeData2016 -> train/ and test/ segmentation shards")
    a.add_argument("--root", type=Path, required=True, help="the ADEChallengeData2016 folder (or its parent)")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--shard-size", type=int, default=1000)
    u = sub.add_parser("subset", help="the union of labeled subsets (as kt-student finetune takes them) as shards")
    u.add_argument("--data", required=True, help="shard spec of the labeled set")
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--labels-per-class", type=int, required=True, help="the largest N the runs take")
    u.add_argument("--subset-seed", type=int, nargs="+", default=[0], help="one subset per seed, their union kept")
    u.add_argument("--shard-size", type=int, default=2000)
    return p


@cli_entry("make_shards")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.source == "fashion-mnist":
        written = make_fashion_mnist(args.out, args.shard_size, args.root, args.limit)
        print(json.dumps({k: len(v) for k, v in written.items()}))
    elif args.source == "fmnist-seg":
        spec = CompositeSpec(size=args.size, garments=tuple(args.garments), scale=tuple(args.scale))
        written = make_fmnist_seg(args.out, args.train, args.test, args.transfer, spec, args.seed, args.shard_size)
        print(json.dumps({k: len(v) for k, v in written.items()}))
    elif args.source == "ade20k":
        written = make_ade20k(args.root, args.out, args.shard_size)
        print(json.dumps({k: len(v) for k, v in written.items()}))
    elif args.source == "subset":
        written = make_subset(args.data, args.out, args.labels_per_class, args.subset_seed, args.shard_size)
        print(json.dumps({"shards": len(written)}))
    elif args.source == "photos":
        written = make_photo_crops(args.out, args.count, args.size, args.seed, args.shard_size)
        print(json.dumps({"shards": len(written)}))
    else:
        written = make_imagefolder(args.root, args.out, args.shard_size, args.prefix, args.shuffle, args.seed)
        print(json.dumps({"shards": len(written)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
