"""webdataset sources: shard specs, decoding, keys, labels and seeded labeled subsets.

A shard spec is a string or a list of strings. Each string may hold several entries separated by
`::` (webdataset's own convention), each entry a brace pattern (`train-{000000..000009}.tar`), a glob,
a directory (all `*.tar` inside, sorted) or an fsspec URL (`s3://bucket/train-{0..9}.tar`). A glob in a URL
(`s3://bucket/train-*.tar`) is listed by that filesystem's own glob (an object store has no directories to walk;
s3fs lists the prefix before the first wildcard) and sorted like a local one; http(s) URLs are taken as they are
(no listing, and `?` starts their query).

Samples come out in shard order, then member order, with the webdataset key (`__key__`) as the sample
key. The key is what views, caches and retrieval manifests are keyed by, so shard makers must keep
keys stable and unique (tools/make_shards.py does). A key seen twice in one shard is refused with one
line naming it (webdataset would merge or drop the second sample); across shards, whoever needs unique
keys checks them (the cache build does, over its whole transfer set).

A sample's content digest (`content_digest`) is a short hash of its encoded image bytes, as stored in
the shard: the cache keeps it beside each sample's targets so that a reader can tell its targets belong
to these pixels and not merely to this key.

Bad samples (a truncated image, a member that is not an image, a broken tar tail) are skipped, counted
and reported through `BadSamples`; a run fails with one clear line when more than `max_fraction` of
what it read is bad.

Segmentation masks (`<key>.mask.png`) are read only when a caller asks (`mask_classes=K`), so classification
never pays for them; their format and checks are `kt.masks`.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import hashlib
import heapq
import io
import json
import lzma
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import braceexpand
from PIL import Image

from kt.errors import UserError
from kt.masks import MASK_EXT, decode_mask, encoded_size
from kt.storage import error_code, filesystem, protocol, storage_error

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
CLASSES_FILE = "classes.json"


# ---------------------------------------------------------------------------------------- shard specs
_GLOB_CHARS = frozenset("*?[")


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a list of shard URLs; raise `UserError` when it names nothing."""
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for entry in entries:
        for part in str(entry).split("::"):
            part = part.strip()
            if not part:
                continue
            for item in braceexpand.braceexpand(part):
                if is_url(item):
                    globbed = _GLOB_CHARS.intersection(item) and protocol(item) not in ("http", "https")
                    urls.extend(_glob_url(item) if globbed else [item])
                    continue
                item = _local(item)
                if os.path.isdir(item):
                    found = sorted(glob.glob(os.path.join(item, "*.tar")))
                    if not found:
                        raise UserError(f"no .tar shards in directory {item}")
                    urls.extend(found)
                elif _GLOB_CHARS.intersection(item):
                    found = sorted(glob.glob(item))
                    if not found:
                        raise UserError(f"no shards match {item}")
                    urls.extend(found)
                elif os.path.isfile(item):
                    urls.append(item)
                else:
                    raise UserError(f"shard not found: {item}")
    if not urls:
        raise UserError(f"empty shard spec: {spec!r}")
    return urls


def _glob_url(pattern: str) -> list[str]:
    """The objects an fsspec URL glob matches, as sorted URLs; a store's refusal is one line."""
    fs, path = filesystem(pattern, doing="list shards")
    try:
        found = fs.glob(path)
    except (OSError, ImportError) as e:
        raise storage_error(pattern, e, "list shards") from None
    if not found:
        raise UserError(f"no shards match {pattern}")
    return sorted(fs.unstrip_protocol(p) for p in found)


def open_binary(url: str):
    """Open a local path or fsspec URL for reading bytes (a filesystem of this process: `kt.storage`)."""
    if is_url(url):
        fs, path = filesystem(url)
        return fs.open(path, "rb")
    return open(_local(url), "rb")


def split_urls(urls: Sequence[str], rank: int = 0, world_size: int = 1,
               worker: int = 0, num_workers: int = 1) -> list[str]:
    """The shards one (rank, worker) reads: disjoint, and together all of them.

    Explicit arguments rather than webdataset's `split_by_node`/`split_by_worker`, which read the
    process group and worker info implicitly; the cache build and training need the same split in
    code paths that have neither.
    """
    return list(urls)[rank::world_size][worker::num_workers]


# ---------------------------------------------------------------------------------- content digests
def content_digest(data: bytes) -> int:
    """A 64-bit digest (blake2b) of a sample's encoded image bytes.

    64 bits: it is compared per key, never searched for, so a chance match needs the wrong image under
    the right key *and* a 2^-64 coincidence; eight bytes per sample keep the cache's overhead negligible.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# --------------------------------------------------------------------------------------- bad samples
class BadSamples:
    """Counts what was read and what was skipped, per shard, and enforces a maximum bad fraction."""

    def __init__(self, max_fraction: float = 0.01):
        self.max_fraction = max_fraction
        self.total = 0
        self.bad: list[dict[str, str]] = []

    def ok(self) -> None:
        self.total += 1

    def record(self, shard: str, key: str, reason: str) -> None:
        self.total += 1
        self.bad.append({"shard": shard, "key": key, "reason": reason})

    @property
    def fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def check(self) -> None:
        if self.bad and self.fraction > self.max_fraction:
            first = self.bad[0]
            raise UserError(
                f"{len(self.bad)} of {self.total} samples are bad ({self.fraction:.1%} > allowed "
                f"{self.max_fraction:.1%}); first: {first['key']} in {first['shard']}: {first['reason']}")

    def summary(self) -> dict[str, Any]:
        return {"read": self.total, "bad": len(self.bad), "bad_samples": self.bad[:100]}


# ------------------------------------------------------------------------------------------- samples
@dataclasses.dataclass
class Sample:
    key: str
    image: Image.Image | None
    label: int | None
    shard: str
    raw: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False)
    digest: int | None = None  # content_digest of the image bytes, when asked for
    mask: Image.Image | None = None  # class index per pixel ("L", or "I" from a 16-bit PNG), when asked for


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so truncation is caught here, not later in a worker)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    return img


def image_ext(sample: dict) -> str | None:
    """The member holding a raw sample's image (the first of IMAGE_EXTS present), None if none does."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


class _Prefixed:
    """A byte stream with its first bytes (read to sniff a compression) put back in front."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data + (self.stream.read(n - len(data)) if len(data) < n else b"")


class _TarStream:
    """A shard's tar byte stream (decompressed here: gzip, bzip2, xz), which remembers its last bytes so that
    where the tar reader stopped can be checked: a complete archive ends in two zero blocks (then padding).

    tarfile reads a stream cut at a member boundary, or a header it cannot parse past the first, as the
    archive's end, and webdataset passes that on: a half-copied shard lost its tail without a word. And tarfile's
    own decompression never checks a compressed stream's end, so a cut .tar.gz read as a shorter archive too;
    Python's GzipFile, BZ2File and LZMAFile do check it (EOFError)."""

    KEEP = 1 << 16  # bytes kept behind the read position: tarfile reads ahead of a header by < 20 KiB
    COMPRESSED = {b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), b"BZh": bz2.BZ2File,
                  b"\xfd7zXZ\x00": lzma.LZMAFile}

    def __init__(self, stream):
        head = stream.read(6)
        opener = next((f for magic, f in self.COMPRESSED.items() if head.startswith(magic)), None)
        self.src = _Prefixed(head, stream) if opener is None else opener(_Prefixed(head, stream))
        self.recent, self.recent_at = bytearray(), 0  # the last bytes read, and the position of the first

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.recent += data
        if len(self.recent) > 2 * self.KEEP:
            drop = len(self.recent) - self.KEEP
            del self.recent[:drop]
            self.recent_at += drop
        return data

    def damage(self, stopped_at: int) -> str | None:
        """None when everything from `stopped_at` (the header position where the tar reader stopped) to the
        stream's end is zeros, at least two blocks of them; else what is wrong."""
        if stopped_at < self.recent_at:  # cannot happen with tarfile's read-ahead; refuse rather than guess
            return f"its tar reader stopped at byte {stopped_at}, before the bytes kept to check its end"
        rest, zeros = self.recent[stopped_at - self.recent_at:], 0
        while rest:
            if rest.count(0) != len(rest):
                return "data after the point where its tar stream stops (a damaged header?)"
            zeros += len(rest)
            rest = self.src.read(1 << 16)
        if zeros < 1024:
            return "no end-of-archive blocks (cut short: a partial download or copy?)"
        return None


def _tar_members(url: str, stream: _TarStream, stop: list) -> Iterator[dict]:
    """The regular members of a tar stream as webdataset's {fname, data, __url__} (its metadata members
    `__*__` left out); `stop` gets the header position where the archive ended. Our own loop over tarfile,
    not webdataset's `tar_file_iterator`: that one hides the TarFile, whose `offset` says where it stopped."""
    tar = tarfile.open(fileobj=stream, mode="r|")
    for info in tar:
        if info.isreg() and not re.match(r"__[^/]*__($|/)", info.name):
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
        tar.members = []  # a stream's members need not be kept: constant memory per shard
    stop.append(tar.offset)


def _raw_members(url: str) -> Iterator[dict]:
    """Raw webdataset samples of one shard. A shard whose tar stream breaks, or ends before its end-of-archive
    blocks, is refused with one line (`UserError`): the samples after the break cannot be read or counted, so
    skipping them as "bad" would lose an unknown part of the transfer set without a word."""
    import webdataset as wds

    read = 0

    def damaged(why: str) -> UserError:
        return UserError(f"shard {url} is damaged after {read} samples: {why}; the rest of it cannot be read. "
                         "Restore the shard (or leave it out of --data) and run again")

    def handler(exn: Exception) -> bool:
        text = str(exn.args[0]) if exn.args else ""
        if isinstance(exn, ValueError) and "duplicate file name in tar file" in text:
            # two members `k.png` in a row: webdataset stops here; a duplicate key is an error, not damage
            name = text.split(":", 1)[0]
            key = wds.tariterators.base_plus_ext(name)[0] or name
            raise UserError(f"duplicate sample key {key!r} in shard {url}; keys must be unique in a transfer set")
        raise exn

    try:
        raw = open_binary(url)
    except (PermissionError, FileNotFoundError) as e:
        if is_url(url):  # no bucket, denied credentials: what to check
            raise storage_error(url, e, "read shard") from None
        raise UserError(f"cannot open shard {url}: {e}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot open shard {url}: {e}") from None
    with raw:
        stop: list[int] = []
        # each sample is held back until the next one begins (or the stream proves whole): a shard cut between a
        # sample's members ends in a partial sample, which must not be read as a whole one
        last = None
        try:
            stream = _TarStream(raw)
            for sample in wds.tariterators.group_by_keys(_tar_members(url, stream, stop), handler=handler):
                if last is not None:
                    yield last
                    read += 1
                last = sample
            why = stream.damage(stop[0])
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- tarfile's ReadError, a decompressor's EOFError, zlib.error, ...
            raise damaged(f"unreadable tar data ({type(e).__name__}: {str(e).split(' @ ')[0]})") from None
        if why is not None:
            raise damaged(why)
        if last is not None:
            yield last


def iter_samples(urls: Sequence[str], bad: BadSamples | None = None,
                 decode: bool | Callable[[str, bytes], Image.Image] = True,
                 keep_raw: bool = False, digest: bool = False, mask_classes: int = 0) -> Iterator[Sample]:
    """Samples of the given shards in order; undecodable ones are skipped and recorded in `bad`.

    A key that comes twice in one shard raises `UserError`. `digest` fills `Sample.digest`. `decode` may be
    a function (key, image bytes) -> image, for a caller that decodes each sample its own way (at the
    reduced scale its views need: `kt.render.decode_for_views`); its failures count as bad. `mask_classes`
    K > 0 reads each sample's mask into `Sample.mask` (checked by `decode_mask`; without `decode`, only its
    presence is checked): a missing or misfit mask makes the sample bad.
    """
    for url in urls:
        seen: set[str] = set()
        for raw in _raw_members(url):
            key = raw.get("__key__", "?")
            if key in seen:
                raise UserError(f"duplicate sample key {key!r} in shard {url}; keys must be unique in a "
                                "transfer set (two samples under one key would share one cached target)")
            seen.add(key)
            ext = image_ext(raw)
            label = None
            try:
                if ext is None:
                    raise ValueError(f"no image member (has: {sorted(k for k in raw if not k.startswith('__'))})")
                if "cls" in raw:
                    label = int(raw["cls"].decode().strip())
                if mask_classes and MASK_EXT not in raw:
                    raise ValueError(f"no mask ({key}.{MASK_EXT}) for segmentation")
                image = (decode(key, raw[ext]) if callable(decode) else decode_image(raw[ext])) if decode else None
                mask = (decode_mask(raw[MASK_EXT], encoded_size(raw[ext]), mask_classes, key)
                        if mask_classes and decode else None)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 -- any decode failure is a bad sample, not a crash
                if bad is None:
                    raise UserError(f"bad sample {key} in {url}: {e}") from None
                bad.record(url, key, f"{type(e).__name__}: {e}")
                continue
            if bad is not None:
                bad.ok()
            yield Sample(key, image, label, url,
                         {k: v for k, v in raw.items() if not k.startswith("__")} if keep_raw else {},
                         content_digest(raw[ext]) if digest else None, mask)


def load_classes(urls: Sequence[str]) -> list[str] | None:
    """Class names from `classes.json` beside the first shard (local shards only), else None."""
    first = urls[0]
    if is_url(first):
        path = first.rsplit("/", 1)[0] + "/" + CLASSES_FILE
        fs, p = filesystem(path)
        try:
            data = fs.cat_file(p)
        except FileNotFoundError as e:
            if error_code(e) == "NoSuchBucket":
                raise storage_error(path, e, "read") from None
            return None
        except OSError as e:
            raise storage_error(path, e, "read") from None
        return parse_classes(data, path)
    path = Path(_local(first)).parent / CLASSES_FILE
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_classes(data, path)


def parse_classes(data: bytes | str, path) -> list[str]:
    """The class names a classes.json holds: a JSON list of strings (an object's keys would be taken for names
    silently, in whatever order it was written)."""
    try:
        classes = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: not JSON ({str(e)[:100]})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        found = type(classes).__name__ if not isinstance(classes, list) else "a list holding non-strings"
        raise UserError(f"{path} must be a JSON list of class names (strings), not {found}")
    return classes


# -------------------------------------------------------------------------------- labeled subsets
def subset_rank(seed: int, key: str) -> str:
    """Order of a key within its class for subset selection: a hash of (seed, key) alone."""
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=16).hexdigest()


class _SmallestRanks:
    """The `n` samples of smallest `subset_rank(seed, key)` offered so far (every one when `n` is None): a bounded
    max-heap of negated ranks, whose top is the largest rank kept. The one selection rule of both subset kinds."""

    def __init__(self, n: int | None, seed: int):
        self.n, self.seed, self.heap = n, seed, []

    def rank(self, key: str) -> int:
        return -int(subset_rank(self.seed, key), 16)

    def wants(self, neg: int) -> bool:
        """Would a sample of (negated) rank `neg` be kept? Asked before decoding it, so most are never decoded."""
        return self.n is None or len(self.heap) < self.n or neg > self.heap[0][0]

    def add(self, neg: int, sample: Sample) -> None:
        item = (neg, sample.key, sample)
        if self.n is None or len(self.heap) < self.n:
            heapq.heappush(self.heap, item)
        else:
            heapq.heapreplace(self.heap, item)

    def __len__(self) -> int:
        return len(self.heap)

    def samples(self) -> list[Sample]:
        return [item[2] for item in self.heap]


def _decode_kept(sample: Sample, bad: BadSamples, mask_classes: int = 0) -> bool:
    """Decode a sample the selection keeps; a corrupt one is recorded bad (the next by rank takes its place). A
    `UserError` (a mask label the classes do not allow) is the user's to fix, not a bad sample."""
    try:
        sample.image = decode_image(sample.raw[image_ext(sample.raw)])
        if mask_classes:
            sample.mask = decode_mask(sample.raw[MASK_EXT], sample.image.size, mask_classes, sample.key)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- counted bad, as iter_samples does
        bad.record(sample.shard, sample.key, f"{type(e).__name__}: {e}")
        return False
    sample.raw = {}
    return True


def labeled_subset(urls: Sequence[str], n_per_class: int | None, seed: int,
                   bad: BadSamples | None = None, num_classes: int | None = None) -> list[Sample]:
    """Exactly `n_per_class` decoded images per class, chosen by `seed`.

    Selection: in each class, the images whose blake2b(seed, key) is smallest. It depends on the seed
    and the keys only, so it is the same across runs, machines, shard order and shard sizes, and a
    larger N holds the smaller N's images. Corrupt images never enter the subset (they are skipped and
    recorded, and the next image by rank takes their place). `n_per_class=None` takes every image.
    Returns samples sorted by (label, key).
    """
    kept: dict[int, _SmallestRanks] = {}
    counts: dict[int, int] = {}
    bad = bad if bad is not None else BadSamples(max_fraction=1.0)
    for sample in iter_samples(urls, bad=bad, decode=False, keep_raw=True):
        if sample.label is None:
            raise UserError(f"sample {sample.key} in {sample.shard} has no .cls label")
        counts[sample.label] = counts.get(sample.label, 0) + 1
        best = kept.setdefault(sample.label, _SmallestRanks(n_per_class, seed))
        neg = best.rank(sample.key)
        if not best.wants(neg):
            continue
        if not _decode_kept(sample, bad):
            counts[sample.label] -= 1
            continue
        best.add(neg, sample)
    bad.check()
    if not kept:
        raise UserError(f"no labeled samples in {urls[0]}{' ...' if len(urls) > 1 else ''}")
    for c in range(num_classes) if num_classes else sorted(kept):
        have = len(kept[c]) if c in kept else 0
        if n_per_class is not None and have < n_per_class:
            raise UserError(f"--labels-per-class {n_per_class} is more than class {c} holds "
                            f"({counts.get(c, 0)} usable images)")
    return sorted((s for best in kept.values() for s in best.samples()), key=lambda s: (s.label, s.key))


def labeled_images(urls: Sequence[str], n: int | None, seed: int, bad: BadSamples | None = None,
                   mask_classes: int = 0, num_classes: int | None = None) -> list[Sample]:
    """`n` decoded samples over the whole set (all when None), chosen by `seed` (`--labeled-images`).

    Selection: the samples whose blake2b(seed, key) (`subset_rank`) is smallest, whatever their class: the
    same ranks as `labeled_subset`, so the subsets are the same on every machine and nested in `n`.
    `mask_classes` K > 0 reads masks (segmentation); otherwise every sample needs a `.cls` label, below
    `num_classes` when given. Bad samples never enter the subset: the next by rank takes their place.
    Returns samples sorted by key.
    """
    best = _SmallestRanks(n, seed)
    bad = bad if bad is not None else BadSamples(max_fraction=1.0)
    for sample in iter_samples(urls, bad=bad, decode=False, keep_raw=True, mask_classes=mask_classes):
        if not mask_classes and sample.label is None:
            raise UserError(f"sample {sample.key} in {sample.shard} has no .cls label")
        if not mask_classes and num_classes and not 0 <= sample.label < num_classes:
            raise UserError(f"sample {sample.key}: label {sample.label} is not a class ({num_classes} classes)")
        neg = best.rank(sample.key)
        if best.wants(neg) and _decode_kept(sample, bad, mask_classes):
            best.add(neg, sample)
    bad.check()
    if not len(best):
        raise UserError(f"no usable samples in {urls[0]}{' ...' if len(urls) > 1 else ''}")
    if n is not None and len(best) < n:
        raise UserError(f"--labeled-images {n} is more than the data holds ({len(best)} usable images)")
    return sorted(best.samples(), key=lambda s: s.key)


# ------------------------------------------------------------------------------------------- writing
def encode_image(image: Image.Image, ext: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(ext, ext.upper()))
    return buf.getvalue()


def check_no_shards(out_dir: str | Path, prefix: str) -> None:
    """Refuse a folder that already holds `prefix-*.tar` shards, before a writer adds its own.

    `write_shards` only adds files: shards of an earlier, longer run beside the new ones would be read as one
    set (old samples, or keys held twice when the shard size changed). Makers call this; `write_shards`
    itself does not, as its other callers write into folders they have already checked or just made.
    """
    old = sorted(Path(out_dir).glob(f"{prefix}-*.tar"))
    if old:
        raise UserError(f"{out_dir} already holds {len(old)} {prefix}-*.tar shards of an earlier run; choose a new "
                        "--out or remove them first")


def write_shards(samples: Iterable, out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000,
                 classes: list[str] | None = None) -> list[str]:
    """Write samples as webdataset tar shards `out_dir/prefix-000000.tar`, ...; returns their paths.

    A sample is a `Sample`, a `(key, PIL.Image | bytes, label | None)` tuple, or a webdataset dict.
    Encoded bytes are written as they are (PNG assumed when no extension is known).
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0,
                         post=written.append) as sink:
        for s in samples:
            if isinstance(s, dict):
                sink.write(s)
                continue
            if isinstance(s, Sample):
                if s.raw:
                    record = {"__key__": s.key, **s.raw}
                    sink.write(record)
                    continue
                key, image, label = s.key, s.image, s.label
            else:
                key, image, label = s
            record = {"__key__": key, "png": image if isinstance(image, bytes) else encode_image(image)}
            if label is not None:
                record["cls"] = str(int(label)).encode()
            sink.write(record)
    if classes is not None:
        (out_dir / CLASSES_FILE).write_text(json.dumps(list(classes)))
    return sorted(written)

