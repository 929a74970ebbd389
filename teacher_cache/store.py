"""The teacher cache on storage: a Zarr v3 group whose layout mirrors the transfer set's shards.

Arrays in, arrays out: this module knows the schema, per-shard completion and fingerprints, not models.
A cache lives at a local path or an fsspec URL (`s3://bucket/cache.zarr`, `memory://x.zarr`).

Layout::

    zarr.json                       root group; attributes:
        kt_cache_format             int, FORMAT_VERSION
        teacher                     {arch, weights_sha256, task, num_classes, classes, image_size, mean, std}
        view                        {spec: {...}, seed, views_per_image}
        targets                     {name: {codec: spec string, item_shape: [...]}}
        task                        {task, num_classes, image_size; segmentation: output_stride, grid [h, w]}
        versions, git_revision, created, plan (optional predicted sizes)
    codecs/<target>/                group per target; attributes = the codec's state attributes, `checksums`
                                    {name: sha256} of its arrays (checked on every read), `complete`
        <name>                      its state arrays (the PCA mean and basis)
    shards/<shard_id>/              one group per input shard; attributes {url, rank}
        keys                        (N,) variable-length UTF-8 sample keys
        digests                     (N,) uint64 content digests of the encoded images (format 2;
                                    `kt.shards.content_digest`): targets belong to these bytes
        params                      (N, V, P) float32 view parameters
        targets/<name>/<part>       (N, V, ...) the codec's parts (see kt.teacher_cache.codecs)
    complete/                       group of completion markers (format 3)
        <shard_id>/zarr.json        one shard's completion marker: a Zarr group whose attributes are the marker

Every array is written with Zarr's sharding codec, one shard spanning the whole array, with ~1 MiB inner
chunks compressed by zstd (inside blosc with byte shuffle for multi-byte numbers), so an input shard
costs a handful of storage objects per target (one per part), not one per sample.

Completion: a shard is complete only when its marker node `complete/<shard_id>/zarr.json` exists and its
attributes are a marker {shard_id, url, n_samples, n_bad, bad: [{key, reason}], checksums: {array path:
sha256}, written_at, rank}. The marker is written last, after all arrays, in one atomic step (a local store
writes a temporary file and renames it; an object store gets the object in one PUT, and never shows a partial
object), and it is removed before a shard's arrays are rewritten. So a job killed at any moment leaves nothing
a reader would take for complete, and a rerun simply rewrites every shard without a marker. Markers are
separate objects, not root attributes, because ranks writing different shards concurrently would race on one
attribute document. Checksums cover what was written (dtype, shape and C-order bytes; keys as UTF-8 JSON) and
are recomputed by `verify_shard`. Markers are Zarr group nodes (format 3) so that they are part of the
hierarchy: zarr's own walks (`members`, `tree`, `consolidate_metadata`) see groups there; format 2 kept them
as plain `complete/<shard_id>.json` objects, which zarr reported as "not recognized as a component of a Zarr
hierarchy". kt writes the node document itself, not through zarr's attribute update, because the write must be
one atomic step (see above).

Where it lives: a local folder or any fsspec URL; the zarr store and the filesystem are opened again in each
process that uses them (`kt.storage.PerProcess`), so a reader made before a DataLoader forks serves its workers.

Formats: 2 adds `digests`; 3 moves the completion markers into the hierarchy. Older caches stay readable. A
format-1 cache's shards have no digests, so readers match data by key only and say so once (`CacheReader`);
a build refuses to resume it (its new shards would be checked and its old ones not), so it is rebuilt with
--overwrite or finished by the kt that started it. A format-2 cache is resumed: its markers are moved to
format 3's place first, then its format is raised (a kt too old for format 3 then refuses it, rather than
finding no markers).

Concurrency: create the cache on one process (`CacheStore.create`), then open it on the others with
`CacheStore.open(url, mode="r+")`; ranks then write disjoint shards without further coordination.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from urllib.parse import urlsplit

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from kt.config import git_revision, package_versions, utc_now
from kt.errors import UserError
from kt.storage import PerProcess, bucket_of, filesystem, storage_error
from kt.teacher_cache.codecs import Codec, parse_codec

FORMAT_VERSION = 3
DIGESTS_SINCE = 2  # the first format whose shards store content digests
MARKER_NODES_SINCE = 3  # the first format whose completion markers are Zarr nodes (complete/<id>/zarr.json)

#: fields of the root attributes that decide whether a cache serves a caller, in the order they are checked
TEACHER_FIELDS = ("arch", "weights_sha256", "task", "num_classes", "classes", "image_size", "mean", "std")
VIEW_FIELDS = ("spec", "seed", "views_per_image")

_CHUNK_BYTES = 1 << 20  # inner chunk size: bounds what a random access by key reads and decodes
# zstd level 1: on real teacher targets (Lite2 on Fashion-MNIST) as small as zstd's default level 3 at half its time
# per 2,000-view shard (fp16 embedding 0.510 of raw at both, 21 vs 52 ms; int8 patches 0.442 vs 0.471, 31 vs 57
# ms); 0.2-2% larger on synthetic ViT-L targets; level 9 saved < 2% more at several times the cost. The writer's
# compression competes with a CPU teacher for the same cores, and readers decode any level.
_ZSTD_LEVEL = 1
_MARKER_FIELDS = {"shard_id": str, "url": str, "n_samples": int, "n_bad": int, "bad": list,
                  "checksums": dict, "written_at": str, "rank": int}
_SHARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CacheStore:
    """A teacher cache opened for reading, or for writing shards (`create`, or `open(mode="r+")`)."""

    def __init__(self, url: str, group: zarr.Group, fs: fsspec.AbstractFileSystem, root: str, local: bool,
                 mode: str = "r", storage_options: dict | None = None):
        self.url, self._root, self._local = url, root, local
        # the zarr group and the filesystem of this process; a forked DataLoader worker opens its own
        self._handles = PerProcess(functools.partial(_reopen, url, mode, storage_options), (group, fs))
        self.attrs: dict = group.attrs.asdict()

    @property
    def group(self) -> zarr.Group:
        return self._handles.get()[0]

    @property
    def _fs(self) -> fsspec.AbstractFileSystem:
        return self._handles.get()[1]

    @property
    def _markers_are_nodes(self) -> bool:
        return self.attrs["kt_cache_format"] >= MARKER_NODES_SINCE

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, url: str, attrs: dict, overwrite: bool = False,
               storage_options: dict | None = None) -> "CacheStore":
        """Create a cache at `url`, or reopen the one there if it was made with the same teacher, view
        and targets (a resumed build). `attrs` holds at least teacher, view and targets; versions,
        git_revision and created are filled in when absent. `overwrite` wipes a cache made otherwise."""
        attrs = _jsonable(attrs)
        for field in ("teacher", "view", "targets"):
            if not isinstance(attrs.get(field), dict):
                raise ValueError(f"cache attributes need a {field!r} dict")
        zstore, fs, root, local = _resolve(url, read_only=False, storage_options=storage_options)
        existing = _existing_group(zstore, url)
        if existing is not None:
            if "kt_cache_format" not in existing.attrs:
                raise UserError(f"{url} holds a Zarr group that is not a kt cache; choose another output path")
            if not overwrite:
                _check_format(existing.attrs.asdict(), url)
                if existing.attrs["kt_cache_format"] < DIGESTS_SINCE:
                    raise UserError(f"{url} is a format-{existing.attrs['kt_cache_format']} cache (no content "
                                    "digests); pass --overwrite to rebuild it, or finish it with the kt that began it")
                try:
                    check_compatible(existing.attrs.asdict(), attrs, exact_targets=True)
                except UserError as e:
                    raise UserError(f"{url} holds another cache ({e}); pass --overwrite to replace it") from None
                # a resume may name more shards (a grown transfer set) or the same ones elsewhere (moved): the
                # cache lists every shard it was asked to hold, at its latest location, for info and verify
                have, want = existing.attrs.get("input_shards") or {}, attrs.get("input_shards") or {}
                if any(have.get(k) != v for k, v in want.items()):
                    existing.attrs.update({"input_shards": {**have, **want}})
                store = cls(url, existing, fs, root, local, "r+", storage_options)
                if existing.attrs["kt_cache_format"] < MARKER_NODES_SINCE:
                    store._move_markers_to_nodes()
                return store
            _remote_call(url, "replace", fs.rm, root, recursive=True)
        elif _remote_call(url, "write", lambda: fs.exists(root) and fs.ls(root, detail=False)):
            raise UserError(f"{url} exists and is not a kt cache; choose another output path")
        full = {
            "kt_cache_format": FORMAT_VERSION,
            **attrs,
            "versions": attrs.get("versions") or package_versions(),
            "git_revision": attrs.get("git_revision") or git_revision(),
            "created": attrs.get("created") or utc_now(),
        }
        group = _remote_call(url, "write", zarr.open_group, zstore, mode="w", attributes=full, zarr_format=3)
        for name in ("shards", "codecs", "complete"):
            group.require_group(name)
        return cls(url, group, fs, root, local, "r+", storage_options)

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> "CacheStore":
        """Open an existing cache: mode "r" to read, "r+" to write shards into it from another rank."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        zstore, fs, root, local = _resolve(url, read_only=mode == "r", storage_options=storage_options)
        group = _existing_group(zstore, url)
        if group is None:
            if bucket_of(url):  # a missing bucket reads as a missing object: say which
                _remote_call(url, "open", fs.info, bucket_of(url))
            raise UserError(f"no kt cache at {url}")
        if "kt_cache_format" not in group.attrs:
            raise UserError(f"{url} is a Zarr group but not a kt cache")
        _check_format(group.attrs.asdict(), url)
        return cls(url, group, fs, root, local, mode, storage_options)

    # -- codec state -------------------------------------------------------------------------------
    def write_codec_state(self, target: str, attrs: dict, arrays: dict[str, np.ndarray]) -> None:
        """Store what rebuilds `target`'s codec (see `Codec.state`), replacing what was there."""
        # arrays first, attributes last: a kill in between leaves a state that reads as absent (refitted)
        group = self.group.create_group(f"codecs/{target}", overwrite=True)
        checksums = {}
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            group.create_array(name, data=value, compressors=_compressor(value.dtype))
            checksums[name] = _checksum(value)
        # checksums as the shards' markers have them: a flipped bit in a PCA basis decodes every patch target
        # of every shard wrong, and re-encoding with the same damaged codec (verify's consistency) cannot see it
        group.attrs.update({**_jsonable(attrs), "checksums": checksums, "complete": True})

    def load_codecs(self) -> dict[str, Codec]:
        """target -> its codec, ready to decode: from the stored state where there is one (PCA),
        from the spec and item shape in the root attributes otherwise."""
        out = {}
        for target, entry in self.attrs["targets"].items():
            state = self.read_codec_state(target)
            if state is not None:
                out[target] = Codec.from_state(*state)
            else:
                out[target] = parse_codec(entry["codec"], target)
                if entry.get("item_shape") is not None:
                    out[target].item_shape = tuple(entry["item_shape"])
        return out

    def read_codec_state(self, target: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(attributes, arrays) written by `write_codec_state`, or None if nothing was written. Arrays that do
        not match their checksums (a cache built before they were kept has none) raise a one-line UserError."""
        try:
            group = self.group[f"codecs/{target}"]
        except KeyError:
            return None
        attrs = group.attrs.asdict()
        if not attrs.pop("complete", False):
            return None
        checksums = attrs.pop("checksums", None)
        try:
            arrays = {name: array[...] for name, array in group.arrays()}
        except Exception as e:  # noqa: BLE001 -- a corrupt chunk fails to decode
            raise UserError(f"{self.url}: the codec state of {target} is damaged ({type(e).__name__}: {e}); "
                            "rebuild the cache (kt-cache build --overwrite)") from None
        for name, digest in (checksums or {}).items():
            if name not in arrays or _checksum(arrays[name]) != digest:
                raise UserError(f"{self.url}: the codec state of {target} is damaged ({name}: "
                                f"{'missing' if name not in arrays else 'checksum mismatch'}); rebuild the cache "
                                "(kt-cache build --overwrite)")
        return attrs, arrays

    def verify_codec_states(self) -> list[str]:
        """Problems with the stored codec states (damaged arrays); [] if fine or if none has checksums."""
        problems = []
        for target in self.attrs["targets"]:
            try:
                self.read_codec_state(target)
            except UserError as e:
                problems.append(str(e).removeprefix(f"{self.url}: "))
        return problems

    # -- shards ------------------------------------------------------------------------------------
    def write_shard(self, shard_id: str, url: str, keys: list[str], params: np.ndarray,
                    targets: dict[str, dict[str, np.ndarray]], bad: list[dict], rank: int = 0,
                    digests: np.ndarray | None = None) -> None:
        """Write one input shard's keys, view parameters, content digests and encoded targets, then mark it
        complete.

        Arrays have the good samples only, in `keys` order; `bad` lists the skipped ones as
        {key, reason}; `digests` (N,) are the samples' `content_digest`s (the build always gives them).
        A shard that was written before (complete or not) is replaced.
        """
        _check_shard_id(shard_id)
        n = len(keys)
        params = np.asarray(params, dtype=np.float32)
        if params.ndim != 3 or params.shape[0] != n:
            raise ValueError(f"params must be (N={n}, V, P), got {params.shape}")
        if set(targets) != set(self.attrs["targets"]):
            raise ValueError(f"targets {sorted(targets)} differ from the cache's {sorted(self.attrs['targets'])}")
        previous = self._read_marker(shard_id)
        if previous is not None and previous["url"] != url:
            raise UserError(f"input shards {previous['url']} and {url} both map to shard id {shard_id!r}; "
                            "rename one of them")
        self._remove_marker(shard_id)  # from here on, a kill leaves the shard incomplete
        group = self.group.create_group(f"shards/{shard_id}", overwrite=True, attributes={"url": url, "rank": rank})
        arrays: dict[str, np.ndarray] = {"keys": np.asarray([str(k) for k in keys], dtype=str).reshape(n),
                                         "params": params}
        if digests is not None:
            arrays["digests"] = np.asarray(digests, dtype=np.uint64).reshape(n)
        for name, parts in targets.items():
            for part, value in parts.items():
                value = np.asarray(value)
                if value.shape[:1] != (n,):
                    raise ValueError(f"target {name}/{part} has shape {value.shape}, first axis must be N={n}")
                arrays[f"targets/{name}/{part}"] = value
        checksums = {}
        try:
            for path, value in arrays.items():
                _write_array(group, path, value)
                checksums[path] = _checksum(value)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"no space left on {self.url} while writing shard {shard_id} "
                                "(left incomplete); free space and rerun") from None
            raise
        marker = {
            "shard_id": shard_id, "url": url, "n_samples": n, "n_bad": len(bad),
            "bad": [{"key": str(b.get("key")), "reason": str(b.get("reason"))} for b in bad],
            "checksums": checksums, "written_at": utc_now(), "rank": int(rank),
        }
        self._write_marker(shard_id, marker)

    def is_complete(self, shard_id: str) -> bool:
        return self._read_marker(shard_id) is not None

    def completed(self) -> dict[str, dict]:
        """shard_id -> marker, for every shard with a valid completion marker."""
        out = {}
        for shard_id in self._marker_ids():
            marker = self._read_marker(shard_id)
            if marker is not None:
                out[marker["shard_id"]] = marker
        return out

    def _marker_ids(self, nodes: bool | None = None) -> list[str]:
        """Shard ids that have something at their marker's place (`nodes`: of format 3, or of format 2 objects)."""
        nodes = self._markers_are_nodes if nodes is None else nodes
        path = self._path("complete")
        self._fs.invalidate_cache(path)  # other ranks add markers: an object store's listing cache would miss them
        try:
            names = self._fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        ids = []
        for name in sorted(names):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            shard_id = base if nodes else base[: -len(".json")] if base.endswith(".json") else ""
            if base != "zarr.json" and _SHARD_ID.fullmatch(shard_id):
                ids.append(shard_id)
        return ids

    def shards_present(self) -> list[str]:
        """Every shard that has a group, complete or not (a killed write leaves one without a marker)."""
        try:
            return sorted(self.group["shards"].group_keys())
        except KeyError:
            return []

    def read_shard(self, shard_id: str, targets: list[str] | None = None) -> dict:
        """{"keys": [str], "params": (N, V, P), "digests": (N,) uint64 or None (format 1), "targets": {name:
        {part: (N, V, ...)}}, "marker": {...}} of a complete shard; the parts are still encoded (decode them
        with the target's codec)."""
        marker = self._require_complete(shard_id)
        names = list(self.attrs["targets"]) if targets is None else list(targets)
        unknown = [t for t in names if t not in self.attrs["targets"]]
        if unknown:
            have = ", ".join(self.attrs["targets"])
            raise UserError(f"cache {self.url} has no target {unknown[0]!r}; it has: {have}")
        group = self.group[f"shards/{shard_id}"]
        out: dict = {"keys": [str(k) for k in group["keys"][...]], "params": group["params"][...],
                     "digests": group["digests"][...] if "digests" in marker["checksums"] else None,
                     "targets": {}, "marker": marker}
        for name in names:
            prefix = f"targets/{name}/"
            out["targets"][name] = {p[len(prefix):]: group[p][...] for p in marker["checksums"] if p.startswith(prefix)}
        return out

    def array(self, shard_id: str, path: str) -> zarr.Array:
        """A lazy handle on one array of a complete shard (random access by row without reading it all)."""
        self._require_complete(shard_id)
        return self.group[f"shards/{shard_id}/{path}"]

    def verify_shard(self, shard_id: str) -> list[str]:
        """Problems with a shard (no marker, missing or unreadable arrays, checksum mismatches); [] if fine."""
        marker = self._read_marker(shard_id)
        if marker is None:
            return [f"{shard_id}: no valid completion marker"]
        problems = []
        expected = {"keys", "params"} | {f"targets/{t}" for t in self.attrs["targets"]}
        if self.attrs["kt_cache_format"] >= DIGESTS_SINCE:
            expected.add("digests")
        covered = {p if not p.startswith("targets/") else "/".join(p.split("/")[:2]) for p in marker["checksums"]}
        problems += [f"{shard_id}: marker lists no array for {p}" for p in sorted(expected - covered)]
        for path, digest in marker["checksums"].items():
            try:
                value = self.group[f"shards/{shard_id}/{path}"][...]
            except KeyError:
                problems.append(f"{shard_id}: missing array {path}")
                continue
            except Exception as e:  # a corrupt chunk fails to decode: report it, keep checking the rest
                problems.append(f"{shard_id}: unreadable array {path} ({type(e).__name__}: {e})")
                continue
            if path == "keys":
                value = np.asarray([str(k) for k in value], dtype=str)
            if _checksum(value) != digest:
                problems.append(f"{shard_id}: checksum mismatch in {path}")
            if value.shape[:1] != (marker["n_samples"],):
                problems.append(f"{shard_id}: {path} has {value.shape[0]} rows, marker says {marker['n_samples']}")
        return problems

    def nbytes_stored(self) -> int:
        """Bytes the cache occupies on storage (to compare with the plan)."""
        return int(self._fs.du(self._root, total=True))

    # -- markers -----------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join((self._root.rstrip("/"),) + parts)

    def _marker_path(self, shard_id: str, node: bool | None = None) -> str:
        if self._markers_are_nodes if node is None else node:
            return self._path("complete", shard_id, "zarr.json")
        return self._path("complete", f"{shard_id}.json")

    def _read_marker(self, shard_id: str, node: bool | None = None) -> dict | None:
        node = self._markers_are_nodes if node is None else node
        try:
            marker = json.loads(self._fs.cat_file(self._marker_path(shard_id, node)))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None  # missing or torn: the shard is not complete
        if node:  # a Zarr group document whose attributes are the marker
            if not isinstance(marker, dict) or marker.get("node_type") != "group":
                return None
            marker = marker.get("attributes")
        if not isinstance(marker, dict) or marker.get("shard_id") != shard_id:
            return None
        for field, kind in _MARKER_FIELDS.items():
            if not isinstance(marker.get(field), kind):
                return None
        if marker["n_bad"] != len(marker["bad"]):
            return None
        return marker

    def _write_marker(self, shard_id: str, marker: dict, node: bool | None = None) -> None:
        if self._markers_are_nodes if node is None else node:
            marker = {"zarr_format": 3, "node_type": "group", "attributes": marker}
        data = json.dumps(marker, indent=1, sort_keys=True).encode()
        path = self._marker_path(shard_id, node)
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".{shard_id}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old state or the whole marker
        else:
            self._fs.pipe_file(path, data)  # one PUT: object stores never show a partial object

    def _remove_marker(self, shard_id: str, node: bool | None = None) -> None:
        node = self._markers_are_nodes if node is None else node
        try:
            self._fs.rm_file(self._marker_path(shard_id, node))
        except FileNotFoundError:
            pass
        if node and self._local:  # a folder left without its zarr.json would be an unknown object to zarr
            shutil.rmtree(os.path.dirname(self._marker_path(shard_id, node)), ignore_errors=True)

    def _move_markers_to_nodes(self) -> None:
        """Resume of a format-2 cache: each marker is written at its format-3 place, its old object removed, then
        the format raised. A kill in between leaves shards without a marker of the format in force: rebuilt."""
        for shard_id in self._marker_ids(nodes=False):
            marker = self._read_marker(shard_id, node=False)
            if marker is not None:
                self._write_marker(shard_id, marker, node=True)
            self._remove_marker(shard_id, node=False)
        self.group.require_group("complete")
        self.group.attrs["kt_cache_format"] = MARKER_NODES_SINCE
        self.attrs["kt_cache_format"] = MARKER_NODES_SINCE

    def _require_complete(self, shard_id: str) -> dict:
        marker = self._read_marker(shard_id)
        if marker is None:
            raise UserError(f"shard {shard_id} is not complete in cache {self.url}; rerun kt-cache build to finish it")
        return marker

    def __repr__(self) -> str:
        return f"CacheStore({self.url!r})"


# ------------------------------------------------------------------------------------------------
def check_compatible(attrs: dict, expected: dict, exact_targets: bool = False) -> None:
    """Raise a one-line UserError naming the first field where the cache `attrs` differ from `expected`.

    Only fields present in `expected` are compared: teacher (arch, weights, task, classes, input size,
    normalisation), then view (spec, seed, views per image), then each expected target's codec and
    item shape. With `exact_targets` the cache must hold exactly the expected targets (a resumed build);
    without it, the expected ones must be among the cache's (a student that needs some of them).
    """
    attrs, expected = _jsonable(attrs), _jsonable(expected)
    for section, fields in (("teacher", TEACHER_FIELDS), ("view", VIEW_FIELDS)):
        want = expected.get(section)
        if want is None:
            continue
        have = attrs.get(section) or {}
        for field in list(fields) + sorted(set(want) - set(fields)):
            if field in want:
                _raise_if_different(f"{section}.{field}", have.get(field, _MISSING), want[field])
    if "targets" not in expected:
        return
    have_targets, want_targets = attrs.get("targets") or {}, expected["targets"]
    for name in want_targets:
        if name not in have_targets:
            raise UserError(f"the cache has no target {name!r} (it has: {', '.join(have_targets) or 'none'})")
    if exact_targets and set(have_targets) != set(want_targets):
        extra = sorted(set(have_targets) - set(want_targets))
        raise UserError(f"targets differ: the cache also has {', '.join(extra)}")
    for name, want in want_targets.items():
        for field, value in want.items():
            _raise_if_different(f"targets.{name}.{field}", have_targets[name].get(field, _MISSING), value)


def shard_id_for(url: str) -> str:
    """A filesystem-safe id for an input shard: its basename without extensions ("train-000003")."""
    path = urlsplit(url).path if "://" in url else url
    base = path.rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"(\.(tar|tgz|gz|zst|bz2|xz|zip))+$", "", base, flags=re.IGNORECASE)
    shard_id = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")
    if not shard_id:
        raise UserError(f"cannot derive a shard id from {url!r}")
    return shard_id


# ------------------------------------------------------------------------------------------------
class _Missing:
    def __repr__(self) -> str:
        return "nothing"


_MISSING = _Missing()


def _raise_if_different(field: str, have, want) -> None:
    diff = _first_difference(have, want, field)
    if diff is not None:
        where, a, b = diff
        raise UserError(f"{where} differs: cache has {_short(a)}, expected {_short(b)}")


def _first_difference(a, b, path: str):
    """(path, a part, b part) of the first place where a and b differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(b) + [k for k in a if k not in b]:
            diff = _first_difference(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None if len(a) == len(b) else (f"{path} length", len(a), len(b))
    if isinstance(a, float) or isinstance(b, float):
        same = isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
        return None if same else (path, a, b)
    return None if a == b and type(a) is type(b) else (path, a, b)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value):
    """What `value` becomes after a trip through JSON (tuples -> lists), so comparisons match storage."""
    return json.loads(json.dumps(value))


def _check_format(attrs: dict, url: str) -> None:
    version = attrs.get("kt_cache_format")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"cache {url} has format {version!r}; this kt reads format <= {FORMAT_VERSION}, upgrade kt")


def _check_shard_id(shard_id: str) -> None:
    if not _SHARD_ID.fullmatch(shard_id):
        raise ValueError(f"shard id {shard_id!r} is not filesystem-safe; use shard_id_for(url)")


def _resolve(url: str, read_only: bool, storage_options: dict | None):
    """(zarr store, fsspec filesystem, root path on it, is local) for a path or URL."""
    split = urlsplit(str(url))
    if "://" not in str(url) or split.scheme == "file":
        root = os.path.abspath(split.path if split.scheme == "file" else str(url))
        if read_only and not os.path.isdir(root):
            raise UserError(f"no kt cache at {url}")
        return LocalStore(root, read_only=read_only), fsspec.filesystem("file"), root, True
    fs, root = filesystem(url, storage_options)
    try:
        zstore = FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot open {url}: {e}") from None
    return zstore, fs, root, False


def _reopen(url: str, mode: str, storage_options: dict | None) -> tuple[zarr.Group, fsspec.AbstractFileSystem]:
    """The store's zarr group and filesystem, opened in this process (`CacheStore._handles`)."""
    zstore, fs, _, _ = _resolve(url, read_only=mode == "r", storage_options=storage_options)
    return zarr.open_group(zstore, mode="r" if mode == "r" else "r+", zarr_format=3), fs


def _remote_call(url: str, doing: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, with what an object store refuses (no bucket, denied) as a one-line `UserError`."""
    try:
        return fn(*args, **kwargs)
    except (PermissionError, FileNotFoundError) as e:
        raise storage_error(url, e, doing) from None


def _existing_group(zstore, url: str) -> zarr.Group | None:
    """The Zarr group at the root of `zstore`, None if there is nothing Zarr there."""
    try:
        return zarr.open_group(zstore, mode="r" if zstore.read_only else "r+", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except PermissionError as e:  # an object store that denies the credentials
        raise storage_error(url, e) from None
    except zarr.errors.ContainsArrayError:
        raise UserError(f"{url} holds a Zarr array, not a kt cache") from None
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{url} is a file, not a cache folder") from None
    except ValueError as e:  # zarr.json that is not JSON (json's error is a ValueError), or not Zarr metadata
        raise UserError(f"{url} is damaged: its Zarr metadata does not read ({e})") from None


def _compressor(dtype: np.dtype | None = None):
    """zstd; for multi-byte numbers inside blosc with byte shuffle, which stores float16 top-k values,
    PCA scales and fp16 features 7-15% smaller than zstd alone (synthetic targets, see tests)."""
    if dtype is not None and dtype.kind in "fiu" and dtype.itemsize > 1:
        return BloscCodec(cname="zstd", clevel=_ZSTD_LEVEL, shuffle="shuffle")
    return ZstdCodec(level=_ZSTD_LEVEL)


def _write_array(group: zarr.Group, path: str, value: np.ndarray) -> None:
    """One array as a single Zarr shard (one storage object) of ~1 MiB zstd-compressed inner chunks."""
    row_bytes = max(1, math.prod(value.shape[1:]) * (value.dtype.itemsize if value.dtype.kind != "U" else 32))
    rows = max(1, min(value.shape[0], _CHUNK_BYTES // row_bytes))
    chunks = (rows,) + tuple(max(1, s) for s in value.shape[1:])
    shards = (max(1, math.ceil(value.shape[0] / rows)) * rows,) + chunks[1:]
    dtype = str if value.dtype.kind == "U" else value.dtype
    array = group.create_array(path, shape=value.shape, dtype=dtype, chunks=chunks, shards=shards,
                               compressors=_compressor(value.dtype), fill_value="" if dtype is str else 0)
    if value.size:
        array[...] = value


def _checksum(value: np.ndarray) -> str:
    digest = hashlib.sha256()
    if value.dtype.kind in "UTO":
        digest.update(json.dumps([str(v) for v in value.reshape(-1)]).encode())
    else:
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


