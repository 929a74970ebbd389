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

Rows past attrs["rows"] are an interrupted append and are cut on the next open for writing, so a
killed `embed` resumes at the first shard not in `shards_done`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kt.errors import UserError

FORMAT = "kt-embeddings"
VERSION = 1
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
class StoreWriter:
    """Appends rows to a store; `commit` makes them visible (attrs["rows"]) as one step."""

    def __init__(self, path: str | Path, dim: int, encoder: dict, normalized: bool, source: dict,
                 resume: bool = False):
        import zarr

        self.path = str(path)
        exists = (Path(self.path) / "zarr.json").exists()
        if exists and resume:
            self.group = zarr.open_group(self.path, mode="r+")
            attrs = dict(self.group.attrs)
            _check_format(attrs, self.path)
            if attrs["dim"] != dim or not encoders_compatible(attrs["encoder"], encoder):
                raise UserError(f"{self.path} was written with another encoder or dimension; "
                                "use a new --out or drop --resume")
            rows = int(attrs["rows"])
            for name in ("embeddings", "keys", "labels", "shard"):  # cut an interrupted append
                arr = self.group[name]
                arr.resize((rows,) + tuple(arr.shape[1:]))
            return
        if exists and not resume:
            raise UserError(f"{self.path} already exists; pass --resume to continue it or choose a new --out")
        self.group = zarr.open_group(self.path, mode="w")
        self.group.create_array("embeddings", shape=(0, dim), dtype="float32", chunks=(CHUNK_ROWS, dim),
                                compressors=None)
        self.group.create_array("keys", shape=(0,), dtype=str, chunks=(CHUNK_ROWS * 4,))
        self.group.create_array("labels", shape=(0,), dtype="int64", chunks=(CHUNK_ROWS * 4,))
        self.group.create_array("shard", shape=(0,), dtype="int32", chunks=(CHUNK_ROWS * 4,))
        self.group.attrs.update({"format": FORMAT, "version": VERSION, "encoder": encoder, "dim": int(dim),
                                 "normalized": bool(normalized), "source": source, "rows": 0,
                                 "shards_done": []})

    @property
    def shards_done(self) -> list[str]:
        return list(self.group.attrs["shards_done"])

    def append(self, vectors: np.ndarray, keys: Sequence[str], labels: Sequence[int | None] | None = None,
               shard: int = -1) -> None:
        n = len(vectors)
        if n == 0:
            return
        labels_arr = np.full(n, -1, dtype=np.int64) if labels is None else \
            np.asarray([-1 if v is None else int(v) for v in labels], dtype=np.int64)
        self.group["embeddings"].append(np.asarray(vectors, dtype=np.float32))
        self.group["keys"].append(np.asarray(list(keys), dtype=str))
        self.group["labels"].append(labels_arr)
        self.group["shard"].append(np.full(n, shard, dtype=np.int32))

    def commit(self, shard_done: str | None = None, normalized: bool | None = None) -> None:
        attrs: dict[str, Any] = {"rows": int(self.group["embeddings"].shape[0])}
        if shard_done is not None:
            attrs["shards_done"] = self.shards_done + [shard_done]
        if normalized is not None:
            attrs["normalized"] = bool(normalized)
        self.group.attrs.update(attrs)


def write_store(path: str | Path, emb: Embeddings, source: dict, block_size: int = 65536) -> str:
    """Write in-memory (or another store's) embeddings as a new store."""
    writer = StoreWriter(path, emb.dim, emb.encoder, emb.normalized, source)
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


def load_embeddings(path: str | Path) -> Embeddings:
    """Open a store; embeddings stay on disk and are read in blocks, keys and labels are loaded."""
    import zarr

    path = str(path)
    if not (Path(path) / "zarr.json").exists():
        raise UserError(f"no embedding store at {path}")
    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    _check_format(attrs, path)
    rows = int(attrs["rows"])
    vectors = group["embeddings"]
    if rows != vectors.shape[0]:  # an interrupted append: expose the committed rows only
        vectors = _RowView(vectors, rows)
    keys = np.asarray(group["keys"][:rows], dtype=object)
    labels = np.asarray(group["labels"][:rows])
    shard = np.asarray(group["shard"][:rows])
    return Embeddings(vectors, keys, attrs["encoder"], bool(attrs["normalized"]),
                      labels if (labels >= 0).any() else None, shard, attrs.get("source", {}), path)


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


def encoders_compatible(a: dict, b: dict) -> bool:
    """Same encoder name and pretrained tag; same weights hash when both sides know it for the same tower.

    Text queries and image galleries of one CLIP model differ in modality (and tower weights) but
    share the embedding space, so only the name and tag are compared across modalities.
    """
    if a.get("name") != b.get("name") or a.get("pretrained") != b.get("pretrained"):
        return False
    if a.get("modality", "image") == b.get("modality", "image"):
        ha, hb = _weights_hash(a), _weights_hash(b)
        if ha is not None and hb is not None and ha != hb:
            return False
    return True


def describe_encoder(enc: dict) -> str:
    text = str(enc.get("name"))
    if enc.get("pretrained") is not None:
        text += f" (pretrained {enc['pretrained']})"
    h = _weights_hash(enc)
    return text + (f" weights {h[:12]}" if h else "")


def check_compatible(what: str, a: Embeddings, ref: Embeddings) -> None:
    """Refuse embeddings of `what` that do not live in the same space as the queries `ref`."""
    if a.dim != ref.dim:
        raise UserError(f"{what} embeddings have dimension {a.dim} but the queries have {ref.dim}")
    if not encoders_compatible(a.encoder, ref.encoder):
        raise UserError(f"{what} embeddings come from encoder {describe_encoder(a.encoder)} but the queries "
                        f"from {describe_encoder(ref.encoder)}; embed both with the same encoder")
    if a.normalized != ref.normalized:
        raise UserError(f"{what} embeddings are {'' if a.normalized else 'not '}L2-normalised but the queries "
                        f"are {'' if ref.normalized else 'not'}; Euclidean distances would not compare")
