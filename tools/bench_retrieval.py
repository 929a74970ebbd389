"""Retrieval benchmark: curate time and peak memory with a gallery on disk, IVF-PQ recall@10 vs exact.

    python -m tools.bench_retrieval                       # 1,000,000 x 512 gallery, 5,000 queries, N = 100,000
    python -m tools.bench_retrieval --gallery 50000 --queries 500 --size 5000   # a quick run

A clustered synthetic gallery (unit-norm rows around random centres, so neighbour lists overlap as real
ones do and IVF-PQ has structure to find) is written chunk by chunk as a kt embedding store in a temporary
directory; `kt-retrieve curate --strategy query-balanced` then runs in a child process, whose peak RSS
(ru_maxrss of the children) is `peak_rss_mb` and whose wall time is `curate_s`. `ivfpq_recall_at_10`
compares an IVF-PQ index over the same gallery (its top 10 x `--rerank` candidates re-ranked by exact
distance, as `curate --index ivfpq` does; `..._no_rerank` without) with exact lists for
`--recall-queries` of the queries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--centers", type=int, default=2000, help="clusters in the synthetic gallery")
    p.add_argument("--block-size", type=int, default=65536)
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--pq-m", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--rerank", type=int, default=4, help="PQ candidates per neighbour re-ranked exactly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep the stores here instead of a temporary directory")
    return p


def _clustered(rng, centers, n, noise=0.6):
    # unit-norm centres; the noise has norm ~`noise`, so clusters overlap but stay distinct
    dim = centers.shape[1]
    x = centers[rng.integers(0, len(centers), n)] + (noise / np.sqrt(dim)) * rng.standard_normal(
        (n, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_stores(workdir: str, args) -> tuple[str, str]:
    from kt.retrieval.embeddings import StoreWriter, from_arrays, write_store

    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.centers, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    enc = {"name": "synthetic", "pretrained": "none", "modality": "image", "model": None}
    gallery = os.path.join(workdir, "gallery.emb")
    w = StoreWriter(gallery, args.dim, enc, True, {"kind": "synthetic"})
    for start in range(0, args.gallery, args.block_size):
        n = min(args.block_size, args.gallery - start)
        w.append(_clustered(rng, centers, n), [f"g{i:07d}" for i in range(start, start + n)])
    w.commit()
    queries = os.path.join(workdir, "queries.emb")
    q = _clustered(rng, centers, args.queries)
    write_store(queries, from_arrays(q, [f"q{i:05d}" for i in range(args.queries)], enc, normalized=True),
                {"kind": "synthetic"})
    return gallery, queries


def ivfpq_recall(gallery_path: str, queries_path: str, args) -> tuple[float, float]:
    from kt.retrieval import index as ix
    from kt.retrieval.embeddings import load_embeddings

    g, q = load_embeddings(gallery_path), load_embeddings(queries_path)
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(len(q), min(len(q), args.recall_queries), replace=False))
    qv = q.read(0, len(q))[pick]
    t0 = time.perf_counter()
    cfg = ix.IVFPQConfig(nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe, seed=args.seed,
                         rerank=args.rerank)
    approx = ix.IVFPQIndex.build(g.read, g.take, len(g), g.dim, cfg, block_size=args.block_size)
    found = approx.search(qv, 10, g.take)  # as `curate --index ivfpq` searches
    build_search_s = time.perf_counter() - t0
    raw = approx.search(qv, 10)
    exact = ix.knn(qv, g.read, len(g), 10, block_size=args.block_size)
    return ix.recall_at(found.ids, exact.ids, 10), ix.recall_at(raw.ids, exact.ids, 10), build_search_s


def run(args=None) -> dict:
    """Run the benchmark; `args` is an argparse Namespace, a list of command-line strings, or None."""
    if args is None or isinstance(args, (list, tuple)):
        args = build_parser().parse_args(list(args or []))
    else:  # a dispatcher's namespace may lack our options: fill in the defaults
        defaults = vars(build_parser().parse_args([]))
        args = argparse.Namespace(**{**defaults, **{k: v for k, v in vars(args).items() if k in defaults}})
    with tempfile.TemporaryDirectory(prefix="kt-bench-retrieval-", dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        gallery, queries = make_stores(tmp, args)
        make_s = time.perf_counter() - t0
        out = os.path.join(tmp, "curated")
        cmd = [sys.executable, "-m", "kt.retrieval.cli", "curate", "--queries", queries, "--gallery", gallery,
               "--strategy", "query-balanced", "--size", str(args.size), "--seed", str(args.seed),
               "--block-size", str(args.block_size), "--no-shards", "--out", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        curate_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"curate failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        recall, recall_raw, ivf_s = ivfpq_recall(gallery, queries, args)
    return {
        "gallery": args.gallery, "dim": args.dim, "queries": args.queries, "size": args.size,
        "block_size": args.block_size, "curate_s": round(curate_s, 2), "peak_rss_mb": round(peak_kb / 1024, 1),
        "k": summary.get("k"), "searches": summary.get("searches"), "selected": summary.get("size"),
        "ivfpq_recall_at_10": round(recall, 4), "ivfpq_recall_at_10_no_rerank": round(recall_raw, 4),
        "ivfpq_rerank": args.rerank, "ivfpq_nlist": args.nlist, "ivfpq_pq_m": args.pq_m,
        "ivfpq_nprobe": args.nprobe, "ivfpq_recall_queries": min(args.queries, args.recall_queries),
        "ivfpq_build_search_s": round(ivf_s, 2), "make_gallery_s": round(make_s, 2),
        "cpus": os.cpu_count(),
    }


def main(argv=None) -> int:
    print(json.dumps(run(build_parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
