"""The build's writer: teacher outputs -> encoded parts -> one complete cache shard, off the teacher's thread.

`Writer` is a thread fed `TeacherBatch`es (a batch of views of one input shard, with the teacher's raw
outputs) and, after a shard's last batch, its `ShardEnd`. Each batch is encoded as it comes; at a shard's
end its parts are stacked to (N, V, ...) in sample order and written with its keys, content digests and
bad-sample list (`CacheStore.write_shard`, which marks the shard complete last).

A sample with a non-finite teacher output (NaN/inf in any target of any view) is a bad sample, like a
corrupt image: its rows are left out of every array and it is listed with the targets at fault, so
`--max-bad-fraction` counts it and `kt-cache info` reports it. Codecs never see the non-finite values
(zeros are encoded in their place before the rows are dropped): a NaN would otherwise turn an int8 scale
or a top-k into garbage silently.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from kt.errors import UserError
from kt.views import PARAM_DIM
from kt.teacher_cache.codecs import Codec
from kt.teacher_cache.store import CacheStore, shard_id_for


@dataclass
class ShardEnd:
    """After a shard's last batch: its good samples, their content digests, and the bad ones."""

    url: str
    keys: list[str]
    digests: np.ndarray  # (N,) uint64 kt.shards.content_digest of each good sample's encoded image
    bad: list[dict]  # {shard, key, reason} of each sample that could not be decoded
    n_read: int


@dataclass
class TeacherBatch:
    """What the writer gets for a `ViewBatch`: the teacher's raw outputs and which rows are finite; targets
    encoded on the teacher's device (`kt.teacher_cache.device_encode`) come as parts instead, each with its
    rows' finite flags (their non-finite rows were encoded as zeros)."""

    url: str
    rows: np.ndarray
    views: np.ndarray
    params: np.ndarray
    raw: dict[str, np.ndarray]  # target -> (b, ...) float32
    finite: np.ndarray  # (b,) bool: every target of that view is finite
    encoded: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # target -> part -> (b, ...)
    encoded_finite: dict[str, np.ndarray] = field(default_factory=dict)  # target -> (b,) bool


def finite_rows(raw: dict[str, np.ndarray]) -> np.ndarray:
    """(b,) True where every target of the view is finite: a NaN/inf teacher output poisons training."""
    return np.logical_and.reduce([np.isfinite(a.reshape(len(a), -1)).all(1) for a in raw.values()])


@dataclass
class _Encoded:
    rows: np.ndarray
    views: np.ndarray
    params: np.ndarray
    parts: dict[str, dict[str, np.ndarray]]  # target -> part -> (b, ...)


@dataclass
class AssembledShard:
    """One input shard ready for `CacheStore.write_shard`: non-finite samples moved to `bad`."""

    keys: list[str]
    digests: np.ndarray
    params: np.ndarray  # (N, V, P)
    targets: dict[str, dict[str, np.ndarray]]  # target -> part -> (N, V, ...)
    bad: list[dict]


class ShardAssembler:
    """Encoded parts of one input shard, filled batch by batch, stacked to (N, V, ...) at the end."""

    def __init__(self, views: int, codecs: dict[str, Codec]):
        self.views, self.codecs = views, codecs
        self.batches: list[_Encoded] = []
        self.nonfinite: dict[int, set[str]] = {}  # row -> targets with a non-finite view

    def add(self, batch: TeacherBatch) -> None:
        self.add_encoded(*self.encode(batch))

    def encode(self, batch: TeacherBatch) -> tuple[_Encoded, dict[int, set[str]]]:
        """The batch's encoded parts and its non-finite rows; touches no state, so threads may run it."""
        raw = batch.raw
        nonfinite: dict[int, set[str]] = {}
        if not batch.finite.all():
            for i in np.flatnonzero(~batch.finite):
                nonfinite.setdefault(int(batch.rows[i]), set()).update(
                    [t for t, a in raw.items() if not np.isfinite(a[i]).all()]
                    + [t for t, ok in batch.encoded_finite.items() if not ok[i]])
            # encode zeros in their place (the rows are dropped at the end): codecs never see NaN
            raw = {t: np.where(batch.finite.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0).astype(a.dtype)
                   for t, a in raw.items()}
        parts = {t: batch.encoded[t] if t in batch.encoded else self.codecs[t].encode(raw[t]) for t in self.codecs}
        return _Encoded(batch.rows, batch.views, batch.params, parts), nonfinite

    def add_encoded(self, encoded: _Encoded, nonfinite: dict[int, set[str]]) -> None:
        self.batches.append(encoded)
        for row, targets in nonfinite.items():
            self.nonfinite.setdefault(row, set()).update(targets)

    def finish(self, end: ShardEnd) -> AssembledShard:
        n = len(end.keys)
        if not self.batches:  # every sample of the shard was bad: an empty, still complete, shard
            if n:
                raise RuntimeError(f"shard assembled no views, expected {n} x {self.views}")
            return AssembledShard([], end.digests, np.zeros((0, self.views, PARAM_DIM), np.float32),
                                  {t: {} for t in self.codecs}, list(end.bad))
        rows = np.concatenate([b.rows for b in self.batches])
        views = np.concatenate([b.views for b in self.batches])
        if len(rows) != n * self.views:
            raise RuntimeError(f"shard assembled {len(rows)} views, expected {n} x {self.views}")
        order = np.lexsort((views, rows))  # batches arrive in order already; this makes it a checked fact
        keep = np.array([r not in self.nonfinite for r in range(n)], dtype=bool)
        in_order, all_good = bool((order == np.arange(len(order))).all()), bool(keep.all())

        def assemble(parts: list[np.ndarray]) -> np.ndarray:
            # (N, V, ...) in sample order, bad samples dropped; no copies beyond the concatenation where the
            # order is already right and every sample is good (the usual case: one copy, not three, of a shard)
            stacked = np.concatenate(parts)
            if not in_order:
                stacked = stacked[order]
            stacked = stacked.reshape(n, self.views, *stacked.shape[1:])
            return stacked if all_good else stacked[keep]

        if not all_good and self.batches[0].params.shape[-1] > PARAM_DIM:
            # mixed views name their partner by row (kt.views.partner_row): dropping a row would move the partners
            # of every row after it
            first = end.keys[min(self.nonfinite)]
            raise UserError(f"{end.url}: the teacher's outputs are not finite for {len(self.nonfinite)} samples (first "
                            f"{first!r}); a cache of mixed views cannot leave samples out; check the teacher")
        params = assemble([b.params for b in self.batches])
        targets = {t: {part: assemble([b.parts[t][part] for b in self.batches]) for part in self.batches[0].parts[t]}
                   for t in self.codecs}
        bad = list(end.bad) + [{"shard": end.url, "key": end.keys[r],
                                "reason": f"non-finite teacher output ({', '.join(sorted(ts))})"}
                               for r, ts in sorted(self.nonfinite.items())]
        return AssembledShard([k for k, ok in zip(end.keys, keep) if ok], end.digests[keep], params, targets, bad)


class Writer:
    """Encodes batches and writes finished shards off the teacher's thread, with `threads` parallel threads
    (0: in the caller's thread, as each job is put; see `BuildConfig.writer_threads`).

    Encoding (numpy) and compression + I/O (numcodecs, zarr) release the GIL, so threads scale until the
    cores do. Batches of one shard may be encoded by different threads in any order; the assembler sorts
    rows by (sample, view) before writing, so the store is bit for bit the same for any thread count. A
    shard's end waits for its own batches still being encoded (all were queued before it, so they are
    already taken) and then writes the shard and its completion marker, one atomic step as before.
    """

    def __init__(self, store: CacheStore, views: int, codecs: dict[str, Codec], rank: int, max_pending: int = 8,
                 threads: int = 1):
        if threads < 0:
            raise UserError(f"--writer-threads must be at least 0, got {threads}")
        self.store, self.views, self.codecs, self.rank = store, views, codecs, rank
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending * threads)
        self.shards: dict[str, ShardAssembler] = {}
        self.error: BaseException | None = None
        self.written: list[dict] = []
        self._in_flight: dict[str, int] = {}  # url -> batches queued but not yet added to its assembler
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self.run, daemon=True, name=f"kt-writer-{i}") for i in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                self._done(job)
                continue  # drain after a failure; the main thread raises it
            try:
                self._do(job)
            except BaseException as e:  # noqa: BLE001 -- handed to the main thread
                self.error = e
                self._done(job)

    def _done(self, job) -> None:
        """Account for a job that was dropped or failed, and wake threads waiting for their shard."""
        with self._cond:
            if isinstance(job, TeacherBatch):
                self._in_flight[job.url] -= 1
            self._cond.notify_all()

    def _do(self, job: TeacherBatch | ShardEnd) -> None:
        if isinstance(job, TeacherBatch):
            with self._cond:
                assembler = self.shards.setdefault(job.url, ShardAssembler(self.views, self.codecs))
            encoded = assembler.encode(job)  # outside the lock: this is the work
            with self._cond:
                assembler.add_encoded(*encoded)
                self._in_flight[job.url] -= 1
                self._cond.notify_all()
            return
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight.get(job.url, 0) == 0 or self.error is not None)
            assembler = self.shards.pop(job.url, ShardAssembler(self.views, self.codecs))
        self.check()
        shard = assembler.finish(job)
        self.store.write_shard(shard_id_for(job.url), job.url, shard.keys, shard.params, shard.targets, shard.bad,
                               rank=self.rank, digests=shard.digests)
        with self._cond:
            self.written.append({"url": job.url, "samples": len(shard.keys), "bad": len(shard.bad),
                                 "read": job.n_read})

    def put(self, job) -> None:
        self.check()
        if isinstance(job, TeacherBatch):
            with self._cond:
                self._in_flight[job.url] = self._in_flight.get(job.url, 0) + 1
        if not self._threads:  # inline: the work is done before put returns, errors raised here
            self._do(job)
            return
        self.jobs.put(job)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        for _ in self._threads:
            self.jobs.put(None)
        for t in self._threads:
            t.join()
        self.check()
