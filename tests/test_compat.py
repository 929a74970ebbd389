"""Artifacts written by earlier kt versions stay readable.

`tests/fixtures/v1_cache` was written by kt at 52bd2a3, before the package layout moved under the `kt`
namespace: Fashion-MNIST's first 12 training images in two shards (`shards/`), a random-init `test_vit`
teacher checkpoint (`teacher/checkpoint`), the cache it built (`cache.zarr`: logits top-k, embedding fp16,
patches int8; 2 views) and what that version's reader decoded from it (`expected.npz`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "v1_cache"


@pytest.fixture
def v1(tmp_path):
    root = tmp_path / "v1"
    shutil.copytree(FIXTURE, root)  # read-only in spirit: tests may not touch the committed copy
    return root


def test_cache_written_before_the_layout_step_decodes_the_same(v1, capsys):
    from kt.teacher_cache.reader import CacheReader

    expected = np.load(v1 / "expected.npz")
    reader = CacheReader(str(v1 / "cache.zarr"))
    # format 1 has no content digests: read, with one warning line, matched by key only
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "format 1" in err and "by key only" in err
    shard_ids = sorted(reader.store.completed())
    assert shard_ids == ["transfer-000000", "transfer-000001"]
    for sid in shard_ids:
        shard = reader.shard(sid, check_views=True)  # the stored views still replay from the seed
        assert list(shard.keys) == list(expected[f"{sid}/keys"])
        np.testing.assert_array_equal(shard.params, expected[f"{sid}/params"])
        assert shard.digests is None
        for target in ("logits", "embedding", "patches"):
            np.testing.assert_array_equal(shard.get(target, slice(0, len(shard))), expected[f"{sid}/{target}"])


def test_cache_written_before_the_layout_step_verifies_against_its_teacher(v1):
    from kt.teacher_cache.inspection import verify_cache

    report = verify_cache(str(v1 / "cache.zarr"), teacher=str(v1 / "teacher" / "checkpoint"),
                          data=str(v1 / "shards"), samples=8)
    assert report["ok"], report["problems"]
    assert report["samples_checked"] == 8
    assert report["fidelity"]["logits"]["top1_agreement"] == 1.0
