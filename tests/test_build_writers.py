"""Parallel writer threads (`--writer-threads`): the store is bit for bit the one a single writer makes."""

from __future__ import annotations

import numpy as np
import pytest

from kt.teacher_cache.cli import main
from kt.teacher_cache.store import CacheStore
from tests.test_reader import build_args, tiny_teacher  # noqa: F401 -- the fixture, shared


def _contents(url: str) -> dict:
    store = CacheStore.open(url)
    out = {}
    for shard_id, marker in store.completed().items():
        shard = store.read_shard(shard_id)
        out[shard_id] = {"keys": list(shard["keys"]), "params": shard["params"],
                         "targets": shard["targets"], "checksums": marker["checksums"],
                         "n_bad": marker["n_bad"]}
    return out


def test_two_writer_threads_write_the_same_store(tiny_teacher, fmnist, tmp_path):  # noqa: F811
    stores = {}
    for threads in (1, 3):
        out = tmp_path / f"w{threads}.zarr"
        # batches of 8: many batches per shard, so threads encode one shard's batches out of order
        args = build_args(tiny_teacher, fmnist["train"][:2], out, "--writer-threads", str(threads),
                          "--codec", "logits=topk:k=3", "--codec", "embedding=fp16,patches=pca:d=16,int8", views=1)
        args[args.index("--batch-size") + 1] = "8"
        assert main(args) == 0
        stores[threads] = _contents(str(out))
    one, three = stores[1], stores[3]
    assert sorted(one) == sorted(three) and len(one) == 2
    for shard_id in one:
        a, b = one[shard_id], three[shard_id]
        assert a["keys"] == b["keys"] and a["checksums"] == b["checksums"] and a["n_bad"] == b["n_bad"]
        np.testing.assert_array_equal(a["params"], b["params"])
        for t in a["targets"]:
            for part in a["targets"][t]:
                np.testing.assert_array_equal(a["targets"][t][part], b["targets"][t][part])


def test_writer_threads_must_be_positive(tiny_teacher, fmnist, tmp_path, capsys):  # noqa: F811
    args = build_args(tiny_teacher, fmnist["train"][:1], tmp_path / "x.zarr", "--writer-threads", "0")
    assert main(args) == 2
    assert "--writer-threads 0: must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_build_benchmark_separates_the_fixed_cost_from_the_per_view_ratio(fmnist, tmp_path):
    from tools import bench_cache

    result = bench_cache.run(["--data", str(fmnist["root"] / "train"), "--build-shards", "1", "--large-shards", "3",
                              "--repeats", "1", "--skip", "fidelity,reader", "--image-size", "32",
                              "--batch-size", "50", "--workers", "0", "--workdir", str(tmp_path)])
    build = result["build"]
    assert build["views"] == 100 and build["large_views"] == 300
    assert build["large_build_over_forward"] > 0 and build["marginal_build_over_forward"] > 0
    # the model: build = fixed + marginal x forward's per-view time; the two sizes reproduce their builds
    per_view_f = (build["large_forward_s"][0] - build["forward_s"][0]) / 200
    per_view_b = build["marginal_build_over_forward"] * per_view_f
    assert abs(build["build_fixed_s"] + per_view_b * 300 - build["large_build_s"][0]) < 0.05
