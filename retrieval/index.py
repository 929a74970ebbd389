"""Nearest-neighbour search with faiss, the gallery streamed in blocks.

Few queries against a huge gallery is the case faiss recommends exact `IndexFlatL2` for; the gallery
never has to fit in memory: each block of `block_size` rows becomes a flat index, every query searches
it, and the per-block top-k lists are merged. Peak memory is the block plus (queries x k) results.

Results are exact and reproducible: faiss picks the candidates, their squared distances are recomputed
in float64 from the stored float32 rows (so they do not depend on how BLAS tiled a block), and lists
are ordered by (distance, gallery index), which breaks ties by gallery order on faiss-cpu and
faiss-gpu alike. faiss-gpu is used when present; its k limit (2048) sends larger searches to faiss-cpu.

`IVFPQIndex` is the approximate option for galleries whose exact search is too slow; `recall_at`
measures it against exact lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from kt.config import field

GPU_MAX_K = 2048  # faiss-gpu's largest k for a flat search
_EXACT_CHUNK_BYTES = 64 << 20  # scratch for the float64 recompute of candidate distances


def faiss():
    import faiss as _faiss  # heavy optional import, only where a search happens

    return _faiss


_gpu_resources = None


def _use_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    f = faiss()
    has_gpu = hasattr(f, "StandardGpuResources") and f.get_num_gpus() > 0
    if device == "gpu" and not has_gpu:
        from kt.errors import UserError

        raise UserError("--device gpu asked for, but faiss has no GPU (install faiss-gpu, or use --device auto)")
    return has_gpu


def flat_index(vectors: np.ndarray, k: int, device: str = "auto"):
    """An exact L2 index over `vectors`, on the GPU when there is one and k fits its limit."""
    f = faiss()
    dim = vectors.shape[1]
    if _use_gpu(device) and k <= GPU_MAX_K:
        global _gpu_resources
        if _gpu_resources is None:
            _gpu_resources = f.StandardGpuResources()
        index = f.GpuIndexFlatL2(_gpu_resources, dim)
    else:
        index = f.IndexFlatL2(dim)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def exact_sqdist(queries: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 squared distances between query i and rows[ids[i, j]]; -1 ids give +inf."""
    nq, k = ids.shape
    out = np.full((nq, k), np.inf)
    if k == 0 or nq == 0:
        return out
    step = max(1, _EXACT_CHUNK_BYTES // max(1, k * rows.shape[1] * 8))
    for s in range(0, nq, step):
        i = ids[s:s + step]
        valid = i >= 0
        diff = rows[np.where(valid, i, 0)].astype(np.float64) - queries[s:s + step, None, :].astype(np.float64)
        d = np.einsum("qkd,qkd->qk", diff, diff)
        out[s:s + step] = np.where(valid, d, np.inf)
    return out


def merge_topk(d_a: np.ndarray, i_a: np.ndarray, d_b: np.ndarray, i_b: np.ndarray, k: int):
    """Per row, the k smallest (distance, id) pairs of two lists; -1 ids (with +inf) pad short lists."""
    d = np.concatenate([d_a, d_b], axis=1)
    i = np.concatenate([i_a, i_b], axis=1)
    # ids of padding sort last among +inf entries
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), d), axis=1)[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


@dataclasses.dataclass
class KnnResult:
    """Per query, gallery indices by increasing (distance, index); `dist` is Euclidean (not squared)."""

    dist: np.ndarray  # (nq, k) float64, +inf where the gallery has fewer than k usable rows
    ids: np.ndarray  # (nq, k) int64, -1 where the gallery has fewer than k usable rows


def knn(queries: np.ndarray, read_block: Callable[[int, int], np.ndarray], n_gallery: int, k: int, *,
        keep: np.ndarray | None = None, block_size: int = 65536, device: str = "auto",
        progress: Callable[[int], None] | None = None) -> KnnResult:
    """Exact k nearest gallery rows of each query, the gallery read block by block.

    Args:
        queries: (nq, D) float32.
        read_block: `read_block(start, stop)` returns gallery rows [start, stop) as float32.
        n_gallery: number of gallery rows.
        k: neighbours per query.
        keep: optional bool mask over the gallery; rows that are False are never returned.
        block_size: gallery rows per block; bounds memory, never changes the result.
        device: "auto" (GPU when faiss has one), "cpu" or "gpu".
        progress: called with the number of gallery rows done after each block.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    best_d = np.full((nq, k), np.inf)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    for start in range(0, n_gallery, block_size):
        stop = min(start + block_size, n_gallery)
        rows = read_block(start, stop)
        gids = np.arange(start, stop, dtype=np.int64)
        if keep is not None and not keep[start:stop].all():  # copy the block only when rows drop out
            sel = np.flatnonzero(keep[start:stop])
            rows, gids = rows[sel], gids[sel]
        kb = min(k, len(rows))
        if kb > 0 and nq > 0:
            _, local = flat_index(rows, kb, device).search(queries, kb)
            d = exact_sqdist(queries, rows, local)
            ids = np.where(local >= 0, gids[np.maximum(local, 0)], -1)
            best_d, best_i = merge_topk(best_d, best_i, d, ids, k)
        if progress is not None:
            progress(stop - start)
    return KnnResult(np.sqrt(best_d), best_i)


def nearest(points: np.ndarray, read_block: Callable[[int, int], np.ndarray], n_gallery: int, *,
            block_size: int = 65536, device: str = "auto",
            progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For every gallery row, its nearest point (index, Euclidean distance); ties go to the lower index.

    `points` is small (the queries, an evaluation set): it is the index, the gallery blocks search it.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    dist = np.empty(n_gallery, dtype=np.float64)
    idx = np.empty(n_gallery, dtype=np.int64)
    index = flat_index(points, 1, device) if len(points) else None
    for start in range(0, n_gallery, block_size):
        stop = min(start + block_size, n_gallery)
        rows = read_block(start, stop)
        if index is None:
            dist[start:stop], idx[start:stop] = np.inf, -1
        else:
            _, j = index.search(rows, 1)
            dist[start:stop] = np.sqrt(exact_sqdist(rows, points, j)[:, 0])
            idx[start:stop] = j[:, 0]
        if progress is not None:
            progress(stop - start)
    return dist, idx


# -------------------------------------------------------------------------------------- approximate
@dataclasses.dataclass
class IVFPQConfig:
    nlist: int = field(1024, "coarse cells; ~sqrt(N) to 4*sqrt(N) is faiss' advice for 1M rows", min=1)
    pq_m: int = field(64, "sub-quantisers (D must be a multiple); 64 bytes per row at 8 bits", min=1)
    nbits: int = field(8, "bits per sub-quantiser code", min=1, max=16)
    nprobe: int = field(32, "cells visited per query: recall against speed", min=1)
    train_size: int = field(65536, "rows sampled to train the quantisers (faiss wants >= 39 * nlist)", min=1)
    seed: int = field(0, "training sample", min=0)
    rerank: int = field(4, "candidates per wanted neighbour re-ranked by exact distance (1: PQ distances only)",
                        min=1)
    rerank_rows: int = field(131072, "candidate rows held at once while re-ranking (256 MiB at D=512)", min=1)


class IVFPQIndex:
    """faiss IVF-PQ over the usable gallery rows, built block by block (codes only: ~pq_m bytes per row)."""

    def __init__(self, dim: int, cfg: IVFPQConfig):
        f = faiss()
        if dim % cfg.pq_m:
            from kt.errors import UserError

            raise UserError(f"--pq-m {cfg.pq_m} must divide the embedding dimension {dim}")
        self.cfg = cfg
        self.quantizer = f.IndexFlatL2(dim)
        self.index = f.IndexIVFPQ(self.quantizer, dim, cfg.nlist, cfg.pq_m, cfg.nbits)

    @classmethod
    def build(cls, read_block: Callable[[int, int], np.ndarray], take: Callable[[np.ndarray], np.ndarray],
              n_gallery: int, dim: int, cfg: IVFPQConfig, keep: np.ndarray | None = None,
              block_size: int = 65536) -> IVFPQIndex:
        self = cls(dim, cfg)
        usable = np.flatnonzero(keep) if keep is not None else np.arange(n_gallery)
        rng = np.random.default_rng(cfg.seed)
        n_train = min(len(usable), cfg.train_size)
        if n_train < 2 ** cfg.nbits:
            # faiss trains each sub-quantiser's 2**nbits centroids by k-means and fails below that many
            # rows. Refused rather than silently searched exactly: the summary would report an index that
            # did not run, and a gallery this small needs no approximate index (exact search is instant).
            from kt.errors import UserError

            have = (f"this gallery has {len(usable)}" if len(usable) < 2 ** cfg.nbits
                    else f"train_size is {cfg.train_size}")
            raise UserError(f"--index ivfpq needs at least {2 ** cfg.nbits} usable gallery rows to train its "
                            f"quantisers ({cfg.nbits}-bit codes), {have}; use --index flat")
        train = take(np.sort(rng.choice(usable, n_train, replace=False)))
        nlist = min(cfg.nlist, max(1, n_train // 39))
        if nlist != cfg.nlist:  # too few rows to train the asked cells well
            self = cls(dim, dataclasses.replace(cfg, nlist=nlist))
        self.index.train(train)
        self.index.nprobe = min(cfg.nprobe, nlist)
        for start in range(0, n_gallery, block_size):
            stop = min(start + block_size, n_gallery)
            rows = read_block(start, stop)
            gids = np.arange(start, stop, dtype=np.int64)
            if keep is not None:
                sel = np.flatnonzero(keep[start:stop])
                rows, gids = rows[sel], gids[sel]
            if len(rows):
                self.index.add_with_ids(rows, gids)
        return self

    def search(self, queries: np.ndarray, k: int,
               take: Callable[[np.ndarray], np.ndarray] | None = None) -> KnnResult:
        """Approximate k nearest rows; with `take` (rows by id from the store) the top `k * rerank`
        PQ candidates are re-ranked by exact distance, in query chunks that bound the rows held."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if take is None or self.cfg.rerank <= 1:
            d, i = self.index.search(queries, k)
            d = np.where(i < 0, np.inf, np.maximum(d, 0).astype(np.float64))
            return KnnResult(np.sqrt(d), i.astype(np.int64))
        kk = k * self.cfg.rerank
        out_d = np.full((len(queries), k), np.inf)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        step = max(1, self.cfg.rerank_rows // kk)
        for s in range(0, len(queries), step):
            qc = queries[s:s + step]
            _, ids = self.index.search(qc, kk)
            ids = ids.astype(np.int64)
            found = ids >= 0
            uniq, inv = np.unique(ids[found], return_inverse=True)
            local = np.full(ids.shape, -1, dtype=np.int64)
            local[found] = inv
            d = exact_sqdist(qc, take(uniq), local)
            out_d[s:s + step], out_i[s:s + step] = merge_topk(out_d[s:s + step], out_i[s:s + step], d, ids, k)
        return KnnResult(np.sqrt(out_d), out_i)


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    a, e = approx_ids[:, :k], exact_ids[:, :k]
    hits = [len(np.intersect1d(a[r][a[r] >= 0], e[r][e[r] >= 0])) / max(1, int((e[r] >= 0).sum()))
            for r in range(len(e))]
    return float(np.mean(hits)) if hits else float("nan")
