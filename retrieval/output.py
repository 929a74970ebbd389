"""Writes a curated selection: manifest, summary, coverage plot and the selected images as shards.

    DIR/manifest.csv   key,query,rank,distance  (one row per selected image; rank is 1-based, empty for
                       `random`, where query is the nearest query and distance its distance)
    DIR/summary.json   strategy, sizes, guard counts, k, timings, per-query and per-class counts
    DIR/coverage.png   how many images each class (or query) brought in
    DIR/shards/*.tar   the selected images copied from the gallery's source shards (webdataset), when the
                       gallery store records them (stores from `kt-retrieve embed`)
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kt.config import run_record
from kt.errors import UserError
from kt.retrieval.curate import Selection
from kt.retrieval.embeddings import Embeddings


def write_manifest(path: Path, sel: Selection, queries: Embeddings, gallery: Embeddings) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "query", "rank", "distance"])
        for g, q, r, d in zip(sel.ids, sel.query, sel.rank, sel.distance):
            w.writerow([gallery.keys[g], queries.keys[q] if q >= 0 else "", int(r) if r > 0 else "",
                        f"{d:.6g}"])


def coverage(sel: Selection, queries: Embeddings) -> dict:
    """Selected images per query key and, when the queries have labels, per class."""
    picked = sel.query[sel.rank > 0] if (sel.rank > 0).any() else sel.query
    per_query = Counter(queries.keys[q] for q in picked[picked >= 0])
    out = {"per_query": {str(k): int(v) for k, v in per_query.items()},
           "queries_with_none": int(len(queries) - len(per_query))}
    if queries.labels is not None:
        per_class = Counter(int(queries.labels[q]) for q in picked[picked >= 0])
        out["per_class"] = {str(k): int(v) for k, v in sorted(per_class.items())}
    return out


def plot_coverage(path: Path, cov: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if "per_class" in cov:
        classes = list(cov["per_class"])
        ax.bar(range(len(classes)), [cov["per_class"][c] for c in classes])
        ax.set_xlabel("class")
        ax.set_ylabel("selected images")
        if len(classes) <= 30:
            ax.set_xticks(range(len(classes)), classes)
    else:
        counts = list(cov["per_query"].values()) + [0] * cov["queries_with_none"]
        ax.hist(counts, bins=min(50, max(1, len(set(counts)))))
        ax.set_xlabel("selected images per query")
        ax.set_ylabel("queries")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def copy_images(out_dir: Path, sel: Selection, gallery: Embeddings, maxcount: int = 1000) -> list[str]:
    """Copy the selected samples, raw bytes unchanged, from the gallery's shards into `out_dir`.

    Each row's image comes from the shard that row was embedded from (`gallery.shard`), not from the first
    shard holding its key: two gallery shards may hold different images under one key, and the image
    written must be the one whose embedding passed the guards (an excluded test image may share the key).
    """
    from kt.shards import iter_samples, write_shards

    shards = list(gallery.source.get("shards") or [])
    if not shards or gallery.shard is None:
        return []
    wanted_rows = np.asarray(sel.ids)
    # The guards keep one row per key, so a selection never holds a key twice and the curated shards
    # pass `kt-cache build`'s key-in-two-shards refusal. A gallery with a key in two shards is still
    # accepted: the guards document same-key rows as duplicates (web-scale galleries collide on keys),
    # so refusing such galleries would turn a handled case into one that must be re-keyed by hand. A
    # selection made elsewhere (the library API) with a repeated key is refused here, naming its shards.
    keys = gallery.keys[wanted_rows]
    uniq, counts = np.unique(keys.astype(str), return_counts=True)
    if (counts > 1).any():
        key = str(uniq[np.argmax(counts > 1)])
        both = [shards[int(gallery.shard[r])] if gallery.shard[r] >= 0 else "?"
                for r in wanted_rows[keys == key][:2]]
        raise UserError(f"the selection holds key {key!r} twice (from {both[0]} and {both[1]}); a transfer "
                        "set needs unique keys")
    wanted: dict[int, set[str]] = {}
    for row, key in zip(wanted_rows, keys):
        if gallery.shard[row] >= 0:
            wanted.setdefault(int(gallery.shard[row]), set()).add(str(key))
    found = 0

    def samples():
        nonlocal found
        # at this point we have each selected row's (shard, key); stream only the shards that hold them,
        # one at a time, so a key is looked up in its own row's shard only
        for i in sorted(wanted):
            for s in iter_samples([shards[i]], decode=False, keep_raw=True):
                if s.key in wanted[i]:
                    found += 1
                    yield s

    written = write_shards(samples(), out_dir, prefix="curated", maxcount=maxcount)
    if found != len(wanted_rows):
        first_shard = shards[min(wanted)] if wanted else "?"
        raise UserError(f"{len(wanted_rows) - found} selected images are missing from the gallery shards "
                        f"({first_shard} ...); were they moved?")
    return written


CURATED_FILES = ("manifest.csv", "summary.json", "coverage.png", "shards")  # what `write_outputs` writes


def check_out(out_dir: str | Path) -> None:
    """Refuse an `--out` that cannot take a curated set, before any search work is done.

    An `--out` already holding a curated set is refused rather than written over: `write_shards` only adds
    files, so a rerun would leave the old run's shards beside the new ones (a transfer set mixing two runs,
    which `kt-cache build` refuses only at its end). `curate` has no `--overwrite`; removing the folder is
    the explicit way to replace it.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    for parent in out.parents:  # the first existing ancestor must be a directory for mkdir to work
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out} is under {parent}, which is a file")
            break
    held = [name for name in CURATED_FILES if (out / name).exists()]
    if held:
        raise UserError(f"--out {out} already holds a curated set ({', '.join(held)}); choose a new --out or "
                        "remove it first")


def write_outputs(out_dir: str | Path, sel: Selection, queries: Embeddings, gallery: Embeddings,
                  shards: bool = True, config: Any = None) -> dict:
    """`config`: the resolved config recorded in `summary.json` (`run.config`), so the IVF-PQ knobs,
    thresholds and block size that made the set are known from the set."""
    check_out(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "manifest.csv", sel, queries, gallery)
    cov = coverage(sel, queries)
    plot_coverage(out / "coverage.png", cov, f"{sel.stats.get('strategy')}: {len(sel.ids)} images")
    written = copy_images(out / "shards", sel, gallery) if shards else []
    summary = {**sel.stats, "coverage": cov, "shards": [str(Path(p).name) for p in written],
               "queries_store": queries.path, "gallery_store": gallery.path, "run": run_record(config)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
