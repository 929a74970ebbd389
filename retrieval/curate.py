"""Transfer-set curation: pick N gallery images for a set of queries (the paper's strategies).

    kt-retrieve curate --queries q.emb --gallery g.emb --strategy query-balanced --size 100000 --out DIR

Euclidean distance in the embedding space throughout. Before any strategy runs, one streaming pass over
the gallery applies the guards: rows within `exclude_threshold` of an excluded embedding (an evaluation
set) are dropped, copies of the queries (distance <= `copy_threshold`, or the same key) are dropped, and
of gallery duplicates (same key, or identical embedding) only the first row is kept. Strategies see the
remaining ("usable") rows only and return exactly N of them, or raise `UserError`.

- best-matches: usable rows by increasing (distance to the nearest query, gallery index);
- query-balanced: the smallest k whose union of the queries' k-nearest usable rows holds >= N; while it
  holds more, the k-th neighbour of a randomly chosen query (seeded order, each query once) is removed;
- random: N usable rows drawn with the seed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np

from kt.config import field
from kt.errors import UserError
from kt.retrieval import index as ix
from kt.retrieval.embeddings import Embeddings, check_embeddings_compatible

STRATEGIES = ("best-matches", "query-balanced", "random")
INDEXES = ("flat", "ivfpq")


@dataclasses.dataclass
class CurateConfig:
    strategy: str = field("query-balanced", "the paper's best strategy for task-oriented transfer")
    size: int = field(10000, "N, the number of images in the curated transfer set", min=1)
    seed: int = field(0, "query order of the query-balanced trimming; the random draw", min=0)
    block_size: int = field(65536, "gallery rows in memory at once (128 MiB at D=512); never changes results",
                            min=1)
    exclude_threshold: float = field(0.05, "Euclidean; near-duplicates of excluded images on unit-norm embeddings",
                                     min=0)
    copy_threshold: float = field(1e-6, "Euclidean; a gallery row this close to a query is that query's copy",
                                  min=0)
    index: str = field("flat", "'flat': exact; 'ivfpq': approximate kNN for query-balanced on huge galleries")
    ivfpq: ix.IVFPQConfig = dataclasses.field(default_factory=ix.IVFPQConfig)
    recall_queries: int = field(100, "queries whose exact lists measure IVF-PQ recall@10", min=0)
    device: str = field("auto", "faiss-gpu when present")

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if self.index not in INDEXES:
            raise UserError(f"unknown index {self.index!r}; choose one of: {', '.join(INDEXES)}")
        if self.size <= 0:
            raise UserError(f"--size must be a positive number of images, got {self.size}")
        if self.block_size <= 0:
            raise UserError(f"--block-size must be positive, got {self.block_size}")


@dataclasses.dataclass
class CurateJob(CurateConfig):
    """`kt-retrieve curate`: the stores to read and write around a `CurateConfig`, IVF-PQ's knobs flattened
    into flags (`ivfpq` is built from them)."""

    queries: str = field("", "embedding store of the labeled images or class prompts", required=True)
    gallery: str = field("", "embedding store of the candidate images", required=True)
    out: str = field("", "output directory (manifest.csv, shards/)", required=True)
    size: int | None = field(None, "N, the number of images in the curated transfer set", required=True,
                               min=1)
    exclude: str = field("", "embedding store whose near-duplicates are dropped (the test set)")
    shards: bool = field(True, "write webdataset shards beside the manifest (--no-shards: the manifest only)")
    nlist: int = field(ix.IVFPQConfig.nlist, "IVF-PQ coarse cells", min=1)
    pq_m: int = field(ix.IVFPQConfig.pq_m, "IVF-PQ sub-quantisers", min=1)
    nprobe: int = field(ix.IVFPQConfig.nprobe, "IVF-PQ cells visited per query", min=1)
    rerank: int = field(ix.IVFPQConfig.rerank, "IVF-PQ candidates per neighbour re-ranked exactly (1: none)",
                        min=1)

    FLAT_IVFPQ = ("nlist", "pq_m", "nprobe", "rerank")  # the IVF-PQ knobs that are flags of their own

    def __post_init__(self):
        # the flat fields are the four knobs' only source (flags, or YAML via `values_from_yaml`); the
        # other IVF-PQ fields (nbits, train_size, ...) may come from a YAML `ivfpq:` mapping
        rest = self.ivfpq if isinstance(self.ivfpq, dict) else dataclasses.asdict(self.ivfpq)
        rest = {k: v for k, v in rest.items() if k not in self.FLAT_IVFPQ}
        self.ivfpq = ix.IVFPQConfig(**rest, **{k: getattr(self, k) for k in self.FLAT_IVFPQ})

    @classmethod
    def values_from_yaml(cls, data: dict, path) -> dict:
        """A YAML `ivfpq:` mapping's knobs that are also flags move to the flat fields.

        Mapped rather than refused: the resolved config recorded beside a curated set holds an `ivfpq`
        mapping, and that record should work as a `--config` file again. Moved before the flags apply,
        so `--nlist` still overrides the file as every flag does. The same knob set twice in one file
        with different values is refused: which one was meant cannot be known.
        """
        nested = data.get("ivfpq")
        if nested is None:
            return data
        valid = [f.name for f in dataclasses.fields(ix.IVFPQConfig)]
        if not isinstance(nested, dict):
            raise UserError(f"ivfpq in {path} must be a mapping of {', '.join(valid)}")
        unknown = sorted(set(nested) - set(valid))
        if unknown:
            raise UserError(f"unknown field(s) in ivfpq in {path}: {', '.join(map(str, unknown))} "
                            f"(valid: {', '.join(valid)})")
        data = dict(data)
        for k in cls.FLAT_IVFPQ:
            if k in nested:
                if k in data and data[k] != nested[k]:
                    raise UserError(f"{path} sets {k} twice: {data[k]!r} and ivfpq.{k} {nested[k]!r}; keep one")
                data[k] = nested[k]
        data["ivfpq"] = {k: v for k, v in nested.items() if k not in cls.FLAT_IVFPQ}
        return data


@dataclasses.dataclass
class Selection:
    """The curated set, in manifest order; `query` is -1 and `rank` 0 where no query selected the row."""

    ids: np.ndarray  # gallery row indices
    query: np.ndarray  # index of the query that selected each row (its nearest one for random)
    rank: np.ndarray  # 1-based neighbour rank of the row for that query (0: not defined, random)
    distance: np.ndarray  # Euclidean distance between the row and that query
    stats: dict


@dataclasses.dataclass
class Guards:
    usable: np.ndarray  # bool mask over the gallery
    near_dist: np.ndarray  # distance of each gallery row to its nearest query
    near_query: np.ndarray  # index of that query
    counts: dict


def _progress(total: int, desc: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="row", unit_scale=True, leave=False, mininterval=2.0,
               disable=None)  # no bar when stderr is not a terminal (logs, tests)
    return bar.update, bar.close


# -------------------------------------------------------------------------------------------- guards
def _row_hashes(block: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes (identical embeddings hash alike)."""
    words = np.ascontiguousarray(block).view(np.uint32)
    out = np.empty(len(block), dtype=np.uint64)
    step = 4096  # bounds the uint64 scratch to 4096 x D x 8 bytes
    for s in range(0, len(words), step):
        out[s:s + step] = (words[s:s + step].astype(np.uint64) * coef).sum(axis=1, dtype=np.uint64)
    return out


def apply_guards(queries: Embeddings, gallery: Embeddings, cfg: CurateConfig,
                 exclude: Embeddings | None = None) -> Guards:
    """One pass over the gallery: nearest query, excluded near-duplicates, query copies, duplicates."""
    q = queries.read(0, len(queries))
    n = len(gallery)
    near_dist = np.empty(n)
    near_query = np.empty(n, dtype=np.int64)
    excl_dist = np.full(n, np.inf)
    hashes = np.empty(n, dtype=np.uint64)
    coef = np.random.default_rng(0x6B74).integers(1, 2**63, size=gallery.dim, dtype=np.uint64) | np.uint64(1)
    qindex = ix.flat_index(q, 1, cfg.device)
    eindex = None
    e = None
    if exclude is not None and len(exclude):
        e = exclude.read(0, len(exclude))
        eindex = ix.flat_index(e, 1, cfg.device)
    update, close = _progress(n, "guards")
    for start in range(0, n, cfg.block_size):
        stop = min(start + cfg.block_size, n)
        rows = gallery.read(start, stop)
        _, j = qindex.search(rows, 1)
        near_dist[start:stop] = np.sqrt(ix.exact_sqdist(rows, q, j)[:, 0])
        near_query[start:stop] = j[:, 0]
        if eindex is not None:
            _, j = eindex.search(rows, 1)
            excl_dist[start:stop] = np.sqrt(ix.exact_sqdist(rows, e, j)[:, 0])
        hashes[start:stop] = _row_hashes(rows, coef)
        update(stop - start)
    close()

    excluded = excl_dist <= cfg.exclude_threshold
    copies = (near_dist <= cfg.copy_threshold) | np.isin(gallery.keys, queries.keys)
    copies &= ~excluded
    usable = ~(excluded | copies)
    # duplicates among the remaining rows: the first row of each key and of each embedding is kept
    dups = np.zeros(n, dtype=bool)
    for values in (gallery.keys, hashes):
        cand = np.flatnonzero(usable & ~dups)
        _, first = np.unique(values[cand], return_index=True)
        keep_rows = np.zeros(n, dtype=bool)
        keep_rows[cand[first]] = True
        dups |= usable & ~dups & ~keep_rows
    usable &= ~dups
    counts = {"gallery": int(n), "excluded": int(excluded.sum()), "query_copies": int(copies.sum()),
              "duplicates": int(dups.sum()), "usable": int(usable.sum())}
    return Guards(usable, near_dist, near_query, counts)


# ---------------------------------------------------------------------------------------- strategies
def union_sizes(ids: np.ndarray) -> np.ndarray:
    """sizes[k-1] = number of distinct ids in the first k columns of `ids` (-1 entries ignored)."""
    nq, k = ids.shape
    flat = ids.T.reshape(-1)  # column-major: all first neighbours, then all second ones, ...
    valid = flat >= 0
    _, first = np.unique(flat[valid], return_index=True)
    first_col = np.flatnonzero(valid)[first] // max(nq, 1)
    return np.cumsum(np.bincount(first_col, minlength=k))[:k]


def trim_to_size(ids: np.ndarray, k: int, size: int, seed: int) -> np.ndarray:
    """Remove k-th neighbours (column k-1) of queries in a seeded random order until `size` ids remain.

    Returns the bool mask of kept list entries over `ids[:, :k]`. Requires union(k-1) < size <= union(k).
    """
    kept = ids[:, :k] >= 0
    uniq, inverse = np.unique(ids[:, :k][kept], return_inverse=True)
    count = np.bincount(inverse, minlength=len(uniq))  # how many lists hold each id
    slot = np.full(ids[:, :k].shape, -1, dtype=np.int64)
    slot[kept] = inverse
    remaining = len(uniq)
    for qi in np.random.default_rng(seed).permutation(len(ids)):
        if remaining == size:
            break
        u = slot[qi, k - 1]
        if u < 0:
            continue
        kept[qi, k - 1] = False
        count[u] -= 1
        remaining -= int(count[u] == 0)
    assert remaining == size, (remaining, size)
    return kept


def _assign(ids: np.ndarray, dist: np.ndarray, kept: np.ndarray):
    """Each selected id's best list entry: smallest rank, then distance, then query; ordered by (query, rank)."""
    qq, rr = np.nonzero(kept)
    gid, dd = ids[qq, rr], dist[qq, rr]
    order = np.lexsort((qq, dd, rr, gid))
    gid, qq, rr, dd = gid[order], qq[order], rr[order], dd[order]
    first = np.r_[True, gid[1:] != gid[:-1]]
    gid, qq, rr, dd = gid[first], qq[first], rr[first], dd[first]
    order = np.lexsort((gid, rr, qq))
    return gid[order], qq[order], rr[order] + 1, dd[order]


def _knn_usable(queries: Embeddings, gallery: Embeddings, k: int, usable: np.ndarray, cfg: CurateConfig,
                q: np.ndarray) -> ix.KnnResult:
    update, close = _progress(len(gallery), f"kNN k={k}")
    try:
        return ix.knn(q, gallery.read, len(gallery), k, keep=usable, block_size=cfg.block_size,
                      device=cfg.device, progress=update)
    finally:
        close()


def query_balanced(queries: Embeddings, gallery: Embeddings, guards: Guards, cfg: CurateConfig) -> Selection:
    q = queries.read(0, len(queries))
    nq, n_usable, size = len(q), int(guards.usable.sum()), cfg.size
    stats: dict = {"searches": []}
    if cfg.index == "ivfpq":
        t0 = time.perf_counter()
        approx = ix.IVFPQIndex.build(gallery.read, gallery.take, len(gallery), gallery.dim, cfg.ivfpq,
                                     keep=guards.usable, block_size=cfg.block_size)
        stats["ivfpq_build_s"] = round(time.perf_counter() - t0, 3)
        n_check = min(nq, cfg.recall_queries)
        stats["ivfpq_recall_at_10"] = None  # not measured (--recall-queries 0): null in JSON, not NaN
        if n_check:
            check = np.random.default_rng(cfg.seed).choice(nq, n_check, replace=False)
            exact10 = _knn_usable(queries, gallery, min(10, n_usable), guards.usable, cfg, q[check])
            stats["ivfpq_recall_at_10"] = ix.recall_at(approx.search(q[check], 10, gallery.take).ids,
                                                       exact10.ids, 10)
        search = lambda kk: approx.search(q, kk, gallery.take)
    else:
        search = lambda kk: _knn_usable(queries, gallery, kk, guards.usable, cfg, q)

    # Each search is a full gallery pass whatever k is, so start at twice the balanced share: with
    # overlapping neighbour lists one pass is then usually enough.
    k = min(n_usable, 2 * math.ceil(size / nq))
    while True:
        res = search(k)
        sizes = union_sizes(res.ids)
        stats["searches"].append({"k": int(k), "union": int(sizes[-1])})
        if sizes[-1] >= size:
            break
        if k >= n_usable:  # approximate search can miss rows; exact search cannot get here
            raise UserError(f"the {cfg.index} index returned only {int(sizes[-1])} distinct images for "
                            f"{size} asked; use --index flat")
        # grow k in proportion to what is missing, at least doubling: each search is a gallery pass
        k = min(n_usable, max(2 * k, math.ceil(k * size / max(1, sizes[-1]) * 1.2)))
    k_min = int(np.searchsorted(sizes, size) + 1)  # smallest k whose union holds >= size
    kept = trim_to_size(res.ids, k_min, size, cfg.seed)
    gid, qq, rr, dd = _assign(res.ids[:, :k_min], res.dist[:, :k_min], kept)
    stats.update({"k": k_min, "union_at_k": int(sizes[k_min - 1]),
                  "union_at_k_minus_1": int(sizes[k_min - 2]) if k_min > 1 else 0})
    return Selection(gid, qq, rr, dd, stats)


def best_matches(queries: Embeddings, gallery: Embeddings, guards: Guards, cfg: CurateConfig) -> Selection:
    cand = np.flatnonzero(guards.usable)
    order = np.lexsort((cand, guards.near_dist[cand]))[:cfg.size]
    gid = cand[order]
    qq, dd = guards.near_query[gid], guards.near_dist[gid]
    # Rank of a row for its query among usable rows: every usable row closer to that query is also
    # selected (its nearest-query distance is smaller), so ranking within the selection is exact.
    rank = np.zeros(len(gid), dtype=np.int64)
    rows = gallery.take(gid, cfg.block_size)
    q = queries.read(0, len(queries))
    for qi in np.unique(qq):
        mine = np.flatnonzero(qq == qi)
        diff = rows.astype(np.float64) - q[qi].astype(np.float64)
        d = np.einsum("nd,nd->n", diff, diff)
        pos = np.empty(len(gid), dtype=np.int64)
        pos[np.lexsort((gid, d))] = np.arange(len(gid))
        rank[mine] = pos[mine] + 1
    return Selection(gid, qq, rank, dd, {})


def random_set(queries: Embeddings, gallery: Embeddings, guards: Guards, cfg: CurateConfig) -> Selection:
    cand = np.flatnonzero(guards.usable)
    gid = np.sort(np.random.default_rng(cfg.seed).choice(cand, cfg.size, replace=False))
    return Selection(gid, guards.near_query[gid], np.zeros(len(gid), dtype=np.int64), guards.near_dist[gid], {})


STRATEGY_FNS = {"best-matches": best_matches, "query-balanced": query_balanced, "random": random_set}


def curate(queries: Embeddings, gallery: Embeddings, cfg: CurateConfig,
           exclude: Embeddings | None = None) -> Selection:
    """Exactly `cfg.size` usable gallery rows chosen by `cfg.strategy` for `queries`."""
    cfg.validate()
    if len(queries) == 0:
        raise UserError("the query set is empty; embed at least one labeled image or class name")
    check_embeddings_compatible("gallery", gallery, queries)
    if exclude is not None:
        check_embeddings_compatible("excluded", exclude, queries)
    t0 = time.perf_counter()
    guards = apply_guards(queries, gallery, cfg, exclude)
    if guards.counts["usable"] < cfg.size:
        c = guards.counts
        raise UserError(f"the gallery has {c['usable']} usable images (of {c['gallery']}: {c['excluded']} "
                        f"excluded, {c['query_copies']} query copies, {c['duplicates']} duplicates dropped) "
                        f"but --size asks for {cfg.size}")
    sel = STRATEGY_FNS[cfg.strategy](queries, gallery, guards, cfg)
    assert len(sel.ids) == cfg.size and len(np.unique(sel.ids)) == cfg.size
    sel.stats = {"strategy": cfg.strategy, "size": cfg.size, "seed": cfg.seed, "index": cfg.index,
                 "queries": len(queries), **guards.counts, **sel.stats,
                 "seconds": round(time.perf_counter() - t0, 3)}
    return sel
