"""The embedding store: what `kt-retrieve embed | import | embed-text` write and `curate` reads.

Layout: a Zarr v3 group (a directory, e.g. `gallery.emb`)

    embeddings  (N, D) float32, chunks of CHUNK_ROWS rows, uncompressed (embeddings do not compress,
                and plain chunks let `curate` stream the gallery block by block with bounded memory)
    keys        (N,) str, the sample key of each row (class names for text queries)
    labels      (N,) int64, the class of each row, -1 when unknown
    shard       (N,) int32, index into attrs["source"]["shards"] of the shard each row came from, -1 if none

    attrs: format ("kt-embeddings"), version, encoder (fingerprint: name, pretrained, modality, weights
           sha256 when known), dim, normalized (rows are L2-normalised), source ({kind: shards | import |
           text, shards: [...], ...}), rows (committed rows), shards_done (for `embed --resume`).

    parts/<i>.npz  only while `embed` runs (or after it was killed): input shard i's rows (embeddings,
                   keys, labels, url), written by whichever process embedded it

Rows past attrs["rows"] are an interrupted append and are cut on the next open for writing; only one
process (the main one) ever appends or writes attributes, so `rows` and `shards_done` change together in
one atomic write of the group's zarr.json and a reader never sees part of a shard.

Several processes (`embed` under `accelerate launch`) share a store through parts: each process embeds
its input shards and writes each as one part file, made visible in one step (written to a temporary
name, then renamed). The main process appends parts to the arrays strictly in input-shard order, each
followed by its commit, and deletes them once committed (`StoreWriter.consolidate`). So the arrays always
hold a prefix of the input shards in order, `shards_done` is that prefix, and the finished store is the
one a single process writes, row for row: readers (`curate`'s blocked reads of the gallery) only ever see
the plain arrays. A killed run leaves committed shards plus complete parts; a rerun with `--resume`
consolidates the parts and embeds only what has neither. A single process takes the same path (one extra
local write of each shard's rows buys one code path); a part holds one input shard, so a process never
holds more than one shard's embeddings.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kt.config import run_record
from kt.errors import UserError

FORMAT = "kt-embeddings"
VERSION = 1
PARTS = "parts"  # folder of per-input-shard parts inside the store (see the module docstring)
CHUNK_ROWS = 16384  # 32 MiB per chunk at D=512: small enough to stream, large enough for fast reads
NORM_ATOL = 1e-3  # |norm - 1| below this on every row counts as L2-normalised


@dataclasses.dataclass
class Embeddings:
    """Embeddings with their keys, read lazily from a store or held in memory (tests, text queries).

    `vectors` is anything sliceable by rows that returns float32 arrays: a Zarr array or a numpy array
    (a memmap included); `read(start, stop)` copies one block so callers never hold the whole gallery.
    """

    vectors: Any
    keys: np.ndarray
    encoder: dict
    normalized: bool
    labels: np.ndarray | None = None
    shard: np.ndarray | None = None
    source: dict = dataclasses.field(default_factory=dict)
    path: str | None = None

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.vectors[start:stop], dtype=np.float32))

    def take(self, ids: np.ndarray, block_size: int = 65536) -> np.ndarray:
        """Rows `ids` (any order), read block by block so only the blocks that hold them are loaded."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        for start in range(0, len(self), block_size):
            lo, hi = np.searchsorted(sorted_ids, [start, start + block_size])
            if lo == hi:
                continue
            block = self.read(start, min(start + block_size, len(self)))
            out[order[lo:hi]] = block[sorted_ids[lo:hi] - start]
        return out


def from_arrays(vectors: np.ndarray, keys: Sequence[str] | None = None, encoder: dict | None = None,
                labels: np.ndarray | None = None, normalized: bool | None = None) -> Embeddings:
    """In-memory embeddings (tests, text queries before they are written)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise UserError(f"embeddings must be a 2-D array (rows, dim), got shape {vectors.shape}")
    keys = np.asarray([str(i) for i in range(len(vectors))] if keys is None else list(keys), dtype=object)
    if len(keys) != len(vectors):
        raise UserError(f"{len(keys)} keys for {len(vectors)} embeddings; need one key per row")
    if normalized is None:
        normalized = is_normalized(vectors)
    return Embeddings(vectors, keys, dict(encoder or {"name": "unknown"}), bool(normalized),
                      None if labels is None else np.asarray(labels, dtype=np.int64))


def is_normalized(vectors: np.ndarray) -> bool:
    if len(vectors) == 0:
        return False
    return bool(np.all(np.abs(np.linalg.norm(vectors, axis=1) - 1.0) < NORM_ATOL))


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------------------- writing
def check_writable(path: str | Path, dim: int, encoder: dict, resume: bool, source: dict | None = None,
                   normalized: bool | None = None) -> bool:
    """Refuse a store that may not be written as asked; True when it exists and will be resumed.

    A resume must compute rows as the store's first run did: same encoder and weights, input size
    (`encoder_image_size`) and normalisation, else one store would mix rows of two embedding spaces.
    Read-only, so every process of a multi-process `embed` can run it before any of them writes.
    """
    import zarr

    path = str(path)
    if not (Path(path) / "zarr.json").exists():
        return False
    if not resume:
        raise UserError(f"{path} already exists; pass --resume to continue it or choose a new --out")
    attrs = dict(zarr.open_group(path, mode="r").attrs)
    _check_format(attrs, path)
    was, now = encoder_image_size(attrs["encoder"]), encoder_image_size(encoder)
    if attrs["encoder"].get("name") == encoder.get("name") and None not in (was, now) and was != now:
        raise UserError(f"{path} was embedded at --image-size {was}, not {now}; --resume needs the same "
                        "--image-size")
    if normalized is not None and bool(attrs["normalized"]) != bool(normalized):
        flag = "--normalize" if attrs["normalized"] else "--no-normalize"
        raise UserError(f"{path} was embedded with {flag}; --resume needs the same flag")
    if attrs["dim"] != dim or not encoders_compatible(attrs["encoder"], encoder):
        raise UserError(f"{path} was written with another encoder or dimension; use a new --out or drop --resume")
    if source is not None and attrs["source"].get("shards") != source.get("shards"):
        raise UserError(f"{path} was embedded from other shards; --resume needs the same --data")
    return True


def _labels_array(labels: Sequence[int | None] | None, n: int) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    return np.asarray([-1 if v is None else int(v) for v in labels], dtype=np.int64)


class StoreWriter:
    """Appends rows to a store; `commit` makes them visible (attrs["rows"]) as one step.

    One writer per store: in a multi-process `embed` only the main process holds one, and the others
    hand their rows over as parts (`write_part`).
    """

    def __init__(self, path: str | Path, dim: int, encoder: dict, normalized: bool, source: dict,
                 resume: bool = False, config: Any = None):
        import zarr

        self.path = str(path)
        if check_writable(self.path, dim, encoder, resume, normalized=normalized):
            self.group = zarr.open_group(self.path, mode="r+")
            rows = int(self.group.attrs["rows"])
            for name in ("embeddings", "keys", "labels", "shard"):  # cut an interrupted append
                arr = self.group[name]
                arr.resize((rows,) + tuple(arr.shape[1:]))
            return
        shutil.rmtree(Path(self.path) / PARTS, ignore_errors=True)  # parts of no store are no one's
        self.group = zarr.open_group(self.path, mode="w")
        self.group.create_array("embeddings", shape=(0, dim), dtype="float32", chunks=(CHUNK_ROWS, dim),
                                compressors=None)
        self.group.create_array("keys", shape=(0,), dtype=str, chunks=(CHUNK_ROWS * 4,))
        self.group.create_array("labels", shape=(0,), dtype="int64", chunks=(CHUNK_ROWS * 4,))
        self.group.create_array("shard", shape=(0,), dtype="int32", chunks=(CHUNK_ROWS * 4,))
        # command, resolved config, git revision, package versions: beside every kt output
        record = run_record(config)
        self.group.attrs.update({"format": FORMAT, "version": VERSION, "encoder": encoder, "dim": int(dim),
                                 "normalized": bool(normalized), "source": source, "rows": 0,
                                 "shards_done": [], "run": record})

    @property
    def shards_done(self) -> list[str]:
        return list(self.group.attrs["shards_done"])

    def append(self, vectors: np.ndarray, keys: Sequence[str], labels: Sequence[int | None] | None = None,
               shard: int = -1) -> None:
        n = len(vectors)
        if n == 0:
            return
        self.group["embeddings"].append(np.asarray(vectors, dtype=np.float32))
        self.group["keys"].append(np.asarray(list(keys), dtype=str))
        self.group["labels"].append(_labels_array(labels, n))
        self.group["shard"].append(np.full(n, shard, dtype=np.int32))

    def commit(self, shard_done: str | None = None, normalized: bool | None = None) -> None:
        attrs: dict[str, Any] = {"rows": int(self.group["embeddings"].shape[0])}
        if shard_done is not None:
            attrs["shards_done"] = self.shards_done + [shard_done]
        if normalized is not None:
            attrs["normalized"] = bool(normalized)
        self.group.attrs.update(attrs)

    def consolidate(self, urls: Sequence[str], require_all: bool = False) -> int:
        """Append the parts that continue the committed prefix of `urls`, in order; returns how many.

        Stops at the first shard that is neither committed nor has a part (another process may still
        be embedding it) unless `require_all`, when that is an error. Parts are deleted once committed,
        and the parts folder once every shard is.
        """
        done = set(self.shards_done)
        appended = 0
        for idx, url in enumerate(urls):
            part = part_path(self.path, idx)
            if url in done:
                part.unlink(missing_ok=True)  # committed by a run killed before it deleted the part
                continue
            if not part.exists():
                if require_all:
                    raise RuntimeError(f"input shard {idx} ({url}) was neither committed nor written as a part")
                return appended
            with np.load(part, allow_pickle=False) as data:
                if str(data["url"]) != url:
                    raise UserError(f"{part} holds rows of {data['url']}, not of input shard {idx} ({url}); "
                                    "embed into a new --out")
                self.append(data["embeddings"], data["keys"].tolist(), data["labels"], shard=idx)
            self.commit(shard_done=url)
            done.add(url)
            part.unlink()
            appended += 1
        shutil.rmtree(Path(self.path) / PARTS, ignore_errors=True)  # stray temporaries of killed writers
        return appended


def part_path(path: str | Path, shard: int) -> Path:
    return Path(path) / PARTS / f"{shard:06d}.npz"


def write_part(path: str | Path, shard: int, url: str, vectors: np.ndarray, keys: Sequence[str],
               labels: Sequence[int | None] | None = None) -> None:
    """Input shard `shard`'s rows as one part file, visible all at once (temporary file, then rename)."""
    final = part_path(path, shard)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.stem}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, embeddings=np.asarray(vectors, dtype=np.float32), keys=np.asarray(list(keys), dtype=str),
                 labels=_labels_array(labels, len(vectors)), url=np.asarray(url))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)  # atomic on POSIX: the part is absent or whole


def parts_written(path: str | Path) -> set[int]:
    """Input-shard indices with a complete part (written, not yet consolidated)."""
    folder = Path(path) / PARTS
    return {int(p.stem) for p in folder.glob("*.npz")} if folder.is_dir() else set()


def load_shards_done(path: str | Path) -> list[str]:
    """The input shards committed to a store (read-only; empty when there is no store yet)."""
    import zarr

    if not (Path(path) / "zarr.json").exists():
        return []
    return list(zarr.open_group(str(path), mode="r").attrs.get("shards_done", []))


def write_store(path: str | Path, emb: Embeddings, source: dict, block_size: int = 65536,
                config: Any = None) -> str:
    """Write in-memory (or another store's) embeddings as a new store; `config` is recorded in its run."""
    writer = StoreWriter(path, emb.dim, emb.encoder, emb.normalized, source, config=config)
    for start in range(0, len(emb), block_size):
        stop = min(start + block_size, len(emb))
        labels = None if emb.labels is None else emb.labels[start:stop]
        writer.append(emb.read(start, stop), emb.keys[start:stop], labels)
    writer.commit()
    return str(path)


# ---------------------------------------------------------------------------------------- reading
def _check_format(attrs: dict, path: str) -> None:
    if attrs.get("format") != FORMAT:
        raise UserError(f"{path} is not a kt embedding store (made by kt-retrieve embed/import/embed-text)")
    if attrs.get("version") != VERSION:
        raise UserError(f"{path} has store version {attrs.get('version')}; this kt reads version {VERSION}")


def load_embeddings(path: str | Path, allow_unfinished: bool = False) -> Embeddings:
    """Open a store; embeddings stay on disk and are read in blocks, keys and labels are loaded.

    A store embedded from shards must hold all of them: a killed `embed` leaves a valid prefix that would
    otherwise pass for the whole set (a gallery missing images, or worse an `--exclude` set missing test
    images that then slip into the curated set). `allow_unfinished` opens the committed prefix anyway
    (tests and tools inspecting a killed run).
    """
    import zarr

    path = str(path)
    if not (Path(path) / "zarr.json").exists():
        raise UserError(f"no embedding store at {path}")
    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    _check_format(attrs, path)
    source = attrs.get("source", {})
    if source.get("kind") == "shards" and not allow_unfinished:
        missing = set(source.get("shards") or []) - set(attrs.get("shards_done", []))
        if missing:
            total = len(source.get("shards") or [])
            raise UserError(f"{path} is unfinished: {total - len(missing)} of {total} shards embedded (a killed "
                            "run?); finish it with kt-retrieve embed --resume and the same flags")
    rows = int(attrs["rows"])
    vectors = group["embeddings"]
    if rows != vectors.shape[0]:  # an interrupted append: expose the committed rows only
        vectors = _RowView(vectors, rows)
    keys = np.asarray(group["keys"][:rows], dtype=object)
    labels = np.asarray(group["labels"][:rows])
    shard = np.asarray(group["shard"][:rows])
    return Embeddings(vectors, keys, attrs["encoder"], bool(attrs["normalized"]),
                      labels if (labels >= 0).any() else None, shard, source, path)


class _RowView:
    """The first `rows` rows of an array (the committed part of a store)."""

    def __init__(self, arr, rows: int):
        self.arr, self.shape = arr, (rows,) + tuple(arr.shape[1:])

    def __getitem__(self, sl: slice):
        start, stop, _ = sl.indices(self.shape[0])
        return self.arr[start:stop]


# ------------------------------------------------------------------------------------------ guards
def _weights_hash(encoder: dict) -> str | None:
    for k, v in encoder.items():
        if "sha256" in k and isinstance(v, str):
            return v
    model = encoder.get("model")
    return _weights_hash(model) if isinstance(model, dict) else None


def encoder_image_size(encoder: dict) -> int | None:
    """The input size an image encoder's fingerprint records (None for text and imported embeddings)."""
    model = encoder.get("model")
    size = model.get("image_size") if isinstance(model, dict) else None
    return int(size) if size is not None else None


def encoders_compatible(a: dict, b: dict) -> bool:
    """Same encoder name and pretrained tag; same weights hash and input size when both sides know them for
    the same tower.

    Text queries and image galleries of one CLIP model differ in modality (and tower weights) but
    share the embedding space, so only the name and tag are compared across modalities. One network at two
    input sizes sees the images at two scales: its embeddings drift apart, so distances between them would
    mix scale with content.
    """
    if a.get("name") != b.get("name") or a.get("pretrained") != b.get("pretrained"):
        return False
    if a.get("modality", "image") == b.get("modality", "image"):
        ha, hb = _weights_hash(a), _weights_hash(b)
        if ha is not None and hb is not None and ha != hb:
            return False
        sa, sb = encoder_image_size(a), encoder_image_size(b)
        if sa is not None and sb is not None and sa != sb:
            return False
    return True


def describe_encoder(enc: dict) -> str:
    text = str(enc.get("name"))
    if enc.get("pretrained") is not None:
        text += f" (pretrained {enc['pretrained']})"
    size = encoder_image_size(enc)
    if size is not None:
        text += f" at {size} px"
    h = _weights_hash(enc)
    return text + (f" weights {h[:12]}" if h else "")


def check_embeddings_compatible(what: str, a: Embeddings, ref: Embeddings) -> None:
    """Refuse embeddings of `what` that do not live in the same space as the queries `ref`."""
    if a.dim != ref.dim:
        raise UserError(f"{what} embeddings have dimension {a.dim} but the queries have {ref.dim}")
    if not encoders_compatible(a.encoder, ref.encoder):
        raise UserError(f"{what} embeddings come from encoder {describe_encoder(a.encoder)} but the queries "
                        f"from {describe_encoder(ref.encoder)}; embed both with the same encoder")
    if a.normalized != ref.normalized:
        raise UserError(f"{what} embeddings are {'' if a.normalized else 'not '}L2-normalised but the queries "
                        f"are {'' if ref.normalized else 'not'}; Euclidean distances would not compare")
