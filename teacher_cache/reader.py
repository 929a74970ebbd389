"""Reading the teacher cache: decoded targets and view parameters of an input shard, aligned with its samples.

    reader = CacheReader("runs/cache.zarr", targets=["logits"],
                         expect={"teacher": fingerprint, "view": {"spec": spec, "seed": 0, "views_per_image": 4}})
    reader.require_complete(urls)                  # one line naming the shards a build has not finished
    shard = reader.shard(urls[0])                  # keys, params (N, V, P), lazily decoded targets
    rows = shard.align(keys_in_data_order)         # row of each sample, keys checked
    logits = shard.get("logits", rows)             # float32 (n, V, K): decodes only these rows

The reader never sees half a shard: only shards with a completion marker are read (`kt.teacher_cache.store`).
Targets are decoded on first use and per requested target, with the codec's vectorised decoder (one
float32 matmul for PCA), so a caller that needs logits never pays for patch features. Stored view
parameters are re-sampled from (spec, seed, key, view) when a shard is opened (`check_views`): a numpy or
kt upgrade that changes the view generator fails loudly instead of pairing targets with other views.
`ShardTargets.digests` are the content digests of the images the targets were computed on, for whoever
reads images beside them (`check_content`); a cache built before they existed (format 1) is read with
one warning line on stderr and its content is not checked.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from kt.errors import UserError
from kt.storage import PerProcess
from kt.views import ViewSet, ViewSpec, check_params_batch
from kt.teacher_cache.codecs import Codec
from kt.teacher_cache.store import DIGESTS_SINCE, CacheStore, check_compatible, shard_id_for

_NAMED = 5  # how many keys / shard ids an error message names before "and N more"


class MissingKeyError(UserError, KeyError):
    """A sample key that the cache does not hold (a `UserError` for CLIs, a `KeyError` for mappings)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CacheReader:
    """A teacher cache opened for reading, checked against what the caller expects.

    Args:
        url: the cache (local path or fsspec URL).
        targets: the targets to read (default: all the cache holds); one it lacks is a `UserError`.
        expect: what the caller needs the cache to have been built with; any of
            {"teacher": {fingerprint fields}, "classes": [...], "num_classes": K,
             "view": {"spec": ViewSpec | dict, "seed": S, "views_per_image": V}, "targets": [...] | {...}}.
            The first difference raises a one-line `UserError` naming the field and both values.
        storage_options: fsspec options for remote stores.
    """

    def __init__(self, url: str, targets: Sequence[str] | None = None, expect: dict | None = None,
                 storage_options: dict | None = None):
        self.url = str(url)
        self.store = CacheStore.open(self.url, mode="r", storage_options=storage_options)
        self.attrs: dict = self.store.attrs
        self.format: int = int(self.attrs["kt_cache_format"])
        if self.format < DIGESTS_SINCE:
            print(f"warning: cache {self.url} is format {self.format}, built before content digests: images are "
                  "matched to targets by key only; rebuild it to have them checked", file=sys.stderr)
        have = list(self.attrs["targets"])
        self.targets: list[str] = have if targets is None else list(targets)
        unknown = [t for t in self.targets if t not in have]
        if unknown:
            raise UserError(f"cache {self.url} has no target {unknown[0]!r}; it holds: {', '.join(have)}")
        if expect:
            self.check(expect)
        view = self.attrs["view"]
        self.view_spec: ViewSpec = ViewSpec.from_dict(view["spec"])
        self.seed: int = int(view["seed"])
        self.views_per_image: int = int(view["views_per_image"])
        self.view_set = ViewSet(self.view_spec, self.seed, self.views_per_image)
        self.image_size: int | None = view.get("image_size")
        teacher = self.attrs["teacher"]
        self.num_classes: int = int(teacher.get("num_classes") or 0)
        self.classes: list[str] | None = teacher.get("classes")
        self._codecs: dict[str, Codec] | None = None
        self._index: dict[str, tuple[str, int]] | None = None
        self._arrays: PerProcess[dict] = PerProcess(dict)  # zarr handles on this process's store (kt.storage)

    # -- what the cache is ----------------------------------------------------------------------
    @property
    def codecs(self) -> dict[str, Codec]:
        """target -> codec ready to decode (PCA state loaded from the store), read on first use."""
        if self._codecs is None:
            self._codecs = self.store.load_codecs()
        return self._codecs

    @property
    def teacher(self) -> dict:
        return self.attrs["teacher"]

    @property
    def task(self) -> dict:
        """{"task", "num_classes", "image_size"} and, for segmentation, "output_stride" and "grid" [h, w] of
        the cached logits; caches written before the build recorded it were all classification caches."""
        if "task" in self.attrs:
            return dict(self.attrs["task"])
        return {"task": self.teacher.get("task", "classification"), "num_classes": self.num_classes,
                "image_size": self.image_size}

    def check(self, expect: dict) -> None:
        """Raise a one-line `UserError` at the first field where the cache differs from `expect`."""
        expected: dict = {}
        teacher = dict(expect.get("teacher") or {})
        for field in ("classes", "num_classes"):
            if field in expect:
                teacher[field] = expect[field]
        if teacher:
            expected["teacher"] = teacher
        if expect.get("view") is not None:
            view = dict(expect["view"])
            spec = view.get("spec")
            if isinstance(spec, ViewSpec):
                view["spec"] = spec.to_dict()
            elif isinstance(spec, dict):
                view["spec"] = ViewSpec.from_dict(spec).to_dict()  # defaults filled in, as the build stores it
            expected["view"] = view
        if expect.get("targets") is not None:
            want = expect["targets"]
            expected["targets"] = dict(want) if isinstance(want, Mapping) else {t: {} for t in want}
        unknown = sorted(set(expect) - {"teacher", "classes", "num_classes", "view", "targets"})
        if unknown:
            raise ValueError(f"unknown expect field(s): {', '.join(unknown)}")
        try:
            check_compatible(self.attrs, expected)
        except UserError as e:
            raise UserError(f"cache {self.url} does not match: {e}") from None

    def require_complete(self, shard_urls: Sequence[str]) -> None:
        """Raise a `UserError` naming the input shards (by id) that the cache has not completed."""
        ids = [shard_id_for(u) for u in shard_urls]
        done = self.store.completed()
        missing = [i for i in ids if i not in done]
        if missing:
            raise UserError(f"cache {self.url} is incomplete: {len(missing)} of {len(ids)} input shards "
                            f"not built ({_named(missing)}); rerun kt-cache build with the same arguments")

    def completed(self) -> dict[str, dict]:
        """shard_id -> completion marker of every complete shard."""
        return self.store.completed()

    # -- one shard ------------------------------------------------------------------------------
    def shard(self, shard_url: str, targets: Sequence[str] | None = None, check_views: bool = True) -> ShardTargets:
        """Keys, view parameters and (lazily decoded) targets of one complete input shard.

        `shard_url` is the input shard's URL or its shard id. With `check_views` every stored parameter
        vector is re-sampled from (spec, seed, key, view); a difference raises `ViewReplayError`.
        """
        names = self.targets if targets is None else list(targets)
        unknown = [t for t in names if t not in self.attrs["targets"]]
        if unknown:
            raise UserError(f"cache {self.url} has no target {unknown[0]!r}; it holds: "
                            f"{', '.join(self.attrs['targets'])}")
        shard_id = shard_id_for(shard_url)
        raw = self.store.read_shard(shard_id, names)
        keys, params = raw["keys"], np.asarray(raw["params"], dtype=np.float32)
        if check_views and len(keys):
            n, v, p = params.shape
            check_params_batch(self.view_spec, self.seed, np.repeat(np.asarray(keys, dtype=object), v).tolist(),
                               np.tile(np.arange(v), n).tolist(), params.reshape(n * v, p))
        return ShardTargets(shard_id, raw["marker"]["url"], keys, params, raw["targets"],
                            {t: self.codecs[t] for t in names}, raw["marker"], raw["digests"])

    # -- random access --------------------------------------------------------------------------
    def lookup(self, key: str) -> tuple[str, int]:
        """(shard_id, row) of a sample key; the index is built from the keys arrays on first use."""
        if self._index is None:
            index: dict[str, tuple[str, int]] = {}
            for shard_id in self.store.completed():
                keys = self.store.array(shard_id, "keys")[...]
                for row, k in enumerate(keys):
                    index.setdefault(str(k), (shard_id, row))  # a key in two shards: the first wins
            self._index = index
        try:
            return self._index[str(key)]
        except KeyError:
            raise MissingKeyError(f"cache {self.url} has no sample {key!r} "
                                  f"({len(self._index)} samples in complete shards)") from None

    def targets_for(self, key: str, view: int) -> dict[str, np.ndarray]:
        """Decoded targets of one (key, view): {target: float32 item}, read without loading the shard."""
        shard_id, row = self.lookup(key)
        self._check_view(view)
        out = {}
        for name in self.targets:
            codec = self.codecs[name]
            parts = {part: self._array(shard_id, f"targets/{name}/{part}")[row:row + 1, view]
                     for part in codec.part_specs(codec.item_shape)}
            out[name] = codec.decode(parts)[0]
        return out

    def params_for(self, key: str, view: int) -> np.ndarray:
        """The stored view parameters (P,) of one (key, view)."""
        shard_id, row = self.lookup(key)
        self._check_view(view)
        return np.asarray(self._array(shard_id, "params")[row, view], dtype=np.float32)

    def _check_view(self, view: int) -> None:
        if not 0 <= int(view) < self.views_per_image:
            raise UserError(f"view {view} out of range: cache {self.url} has {self.views_per_image} views per image")

    def _array(self, shard_id: str, path: str):
        arrays = self._arrays.get()
        handle = arrays.get((shard_id, path))
        if handle is None:
            handle = arrays[(shard_id, path)] = self.store.array(shard_id, path)
        return handle

    def __repr__(self) -> str:
        return f"CacheReader({self.url!r}, targets={self.targets})"


class ShardTargets:
    """One input shard's cached samples: `keys`, `params` (N, V, P), `digests` (N,) uint64 content digests
    (None for a format-1 cache) and `targets` {name: float32 (N, V, ...)}.

    `targets[name]` decodes the whole shard on first access and keeps it; `get(name, rows)` decodes only
    the given rows (a training batch) without keeping anything. `encoded` holds the stored parts.
    """

    def __init__(self, shard_id: str, url: str, keys: list[str], params: np.ndarray,
                 encoded: dict[str, dict[str, np.ndarray]], codecs: dict[str, Codec], marker: dict,
                 digests: np.ndarray | None = None):
        self.shard_id, self.url, self.keys, self.params, self.digests = shard_id, url, keys, params, digests
        self.encoded, self.codecs, self.marker = encoded, codecs, marker
        self.bad: list[dict] = marker.get("bad", [])
        self.targets = _DecodedTargets(self)
        self._rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def rows(self) -> dict[str, int]:
        """key -> row index."""
        if self._rows is None:
            self._rows = {k: i for i, k in enumerate(self.keys)}
        return self._rows

    def get(self, name: str, rows=None, view: int | None = None) -> np.ndarray:
        """Decoded float32 target `name` for `rows` (indices, a slice, or None for all): (n, V, ...), or
        (n, ...) for one `view` index (what a training step needs: only that view is decoded)."""
        if name not in self.encoded:
            raise UserError(f"target {name!r} was not read from shard {self.shard_id}; read: {', '.join(self.encoded)}")
        parts = self.encoded[name]
        index = (slice(None) if rows is None else rows,) + (() if view is None else (view,))
        if rows is not None or view is not None:
            parts = {p: a[index] for p, a in parts.items()}
        out = self.codecs[name].decode(parts)
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def align(self, keys: Sequence[str]) -> np.ndarray:
        """Row index (int64) of each key, in the order given; keys the cache lacks raise a `UserError`."""
        rows = self.rows
        out = np.fromiter((rows.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        if (out < 0).any():
            missing = [k for k, r in zip(keys, out) if r < 0]
            known_bad = {b["key"] for b in self.bad}
            note = f"; {sum(k in known_bad for k in missing)} of them were bad samples at build time" \
                if known_bad & set(missing) else ""
            raise UserError(f"cache shard {self.shard_id} lacks {len(missing)} of {len(keys)} sample keys "
                            f"({_named(missing)}){note}; was the cache built from these shards?")
        return out

    def check_content(self, key: str, digest: int, data_url: str) -> None:
        """Raise a one-line `UserError` unless `digest` (`kt.shards.content_digest` of a sample's encoded image)
        is that of the image `key`'s targets were computed on; a shard without digests (format 1) checks nothing."""
        if self.digests is None:
            return
        if int(digest) != int(self.digests[self.rows[key]]):
            raise UserError(f"sample {key} of data shard {data_url} is not the image cache shard {self.shard_id} "
                            "was built from (content digest differs); pass the transfer set the cache was built from")

    def __repr__(self) -> str:
        return f"ShardTargets({self.shard_id!r}, n={len(self)}, targets={list(self.encoded)})"


class _DecodedTargets(Mapping):
    """target -> decoded float32 (N, V, ...), decoded on first access."""

    def __init__(self, shard: ShardTargets):
        self._shard, self._cache = shard, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name not in self._shard.encoded:
                raise KeyError(name)
            self._cache[name] = self._shard.get(name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard.encoded)

    def __len__(self) -> int:
        return len(self._shard.encoded)


def _named(items: Sequence[str]) -> str:
    shown = ", ".join(repr(i) if not isinstance(i, str) else i for i in items[:_NAMED])
    return shown + (f" and {len(items) - _NAMED} more" if len(items) > _NAMED else "")
