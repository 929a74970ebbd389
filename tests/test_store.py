"""The cache schema: round trips, object counts, completion markers, checksums, refusals, URLs."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest

from kt.errors import UserError
from kt.teacher_cache.codecs import parse_codec
from kt.teacher_cache.store import CacheStore, _jsonable, check_compatible, shard_id_for

V, P = 2, 7


def _attrs(**changes) -> dict:
    attrs = {
        "teacher": {"arch": "tf_efficientnet_lite0", "weights_sha256": "ab" * 32, "task": "classification",
                    "num_classes": 3, "classes": ["cat", "dog", "owl"], "image_size": 224,
                    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "view": {"spec": {"crop_scale": [0.2, 1.0], "flip": True}, "seed": 0, "views_per_image": V},
        "targets": {"logits": {"codec": "topk:k=2", "item_shape": [3]},
                    "patches": {"codec": "pca:d=4,int8", "item_shape": [2, 2, 8]}},
        "plan": {"bytes_per_sample": 123},
    }
    for path, value in changes.items():
        section, field = path.split("__")
        attrs[section][field] = value
    return attrs


def _shard(n: int, seed: int = 0):
    """keys, params and encoded targets of n samples, as a build would hand them over."""
    rng = np.random.default_rng(seed)
    keys = [f"s{seed:02d}_{i:05d}" for i in range(n)]
    params = rng.random((n, V, P), dtype=np.float32)
    logits = parse_codec("topk:k=2", "logits").encode(rng.normal(size=(n, V, 3)).astype(np.float32))
    pca = parse_codec("pca:d=4,int8", "patches")
    patches = rng.normal(size=(n, V, 2, 2, 8)).astype(np.float32)
    pca.fit(rng.normal(size=(4, 2, 2, 8)))
    return keys, params, {"logits": logits, "patches": pca.encode(patches)}


def _digests(n: int) -> np.ndarray:
    """Content digests as a build hands them over (any uint64 per sample; format 2 shards have them)."""
    return np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


@pytest.fixture
def cache(tmp_path) -> CacheStore:
    return CacheStore.create(str(tmp_path / "cache.zarr"), _attrs())


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_write_read_round_trip(cache):
    keys, params, targets = _shard(10)
    bad = [{"key": "s00_99999", "reason": "truncated"}]
    digests = np.arange(10, dtype=np.uint64) + np.uint64(2**63)  # the whole uint64 range round-trips
    cache.write_shard("train-000000", "/data/train-000000.tar", keys, params, targets, bad, digests=digests)
    reopened = CacheStore.open(cache.url)
    assert reopened.attrs["teacher"]["classes"] == ["cat", "dog", "owl"]
    assert reopened.attrs["kt_cache_format"] == 3 and "numpy" in reopened.attrs["versions"]
    out = reopened.read_shard("train-000000")
    assert out["keys"] == keys
    np.testing.assert_array_equal(out["digests"], digests)
    assert out["digests"].dtype == np.uint64 and reopened.verify_shard("train-000000") == []
    np.testing.assert_array_equal(out["params"], params)
    for name, parts in targets.items():
        assert set(out["targets"][name]) == set(parts)
        for part, value in parts.items():
            np.testing.assert_array_equal(out["targets"][name][part], value)
            assert out["targets"][name][part].dtype == value.dtype
    assert out["marker"]["n_samples"] == 10 and out["marker"]["bad"] == bad
    assert set(reopened.read_shard("train-000000", targets=["logits"])["targets"]) == {"logits"}
    assert reopened.completed()["train-000000"]["url"] == "/data/train-000000.tar"
    assert reopened.verify_shard("train-000000") == []
    assert reopened.array("train-000000", "targets/logits/values")[3:5].shape == (2, V, 2)
    with pytest.raises(UserError, match="no target 'embedding'"):
        reopened.read_shard("train-000000", targets=["embedding"])


def test_storage_objects_do_not_grow_with_samples(cache, tmp_path):
    for i, n in enumerate((3, 3000)):
        cache.write_shard(f"train-{i:06d}", f"train-{i:06d}.tar", *_shard(n, seed=i), bad=[])
    root = tmp_path / "cache.zarr"
    small = [f for f in _files(root) if "train-000000" in f]
    large = [f for f in _files(root) if "train-000001" in f]
    # 7 arrays (keys, params, 3 top-k parts, 2 pca parts) x (metadata + one shard object),
    # 4 group metadata objects (shard, targets, targets/logits, targets/patches), 1 marker
    assert len(small) == len(large) == 7 * 2 + 4 + 1
    assert cache.nbytes_stored() > 0


def test_empty_shard_of_only_bad_samples(cache):
    keys, params, targets = _shard(0)
    bad = [{"key": "a", "reason": "truncated"}, {"key": "b", "reason": "not an image"}]
    cache.write_shard("train-000004", "train-000004.tar", keys, params, targets, bad, digests=_digests(0))
    out = cache.read_shard("train-000004")
    assert out["keys"] == [] and out["params"].shape == (0, V, P)
    assert out["marker"]["n_bad"] == 2 and cache.verify_shard("train-000004") == []


def test_arrays_without_marker_are_incomplete(cache, tmp_path):
    cache.write_shard("train-000000", "train-000000.tar", *_shard(5), bad=[])
    os.remove(tmp_path / "cache.zarr" / "complete" / "train-000000" / "zarr.json")  # as if killed before the marker
    assert not cache.is_complete("train-000000")
    assert "train-000000" not in cache.completed()
    assert cache.shards_present() == ["train-000000"]
    with pytest.raises(UserError, match="not complete"):
        cache.read_shard("train-000000")
    assert cache.verify_shard("train-000000") == ["train-000000: no valid completion marker"]
    # a rerun rewrites it and completes it
    keys, params, targets = _shard(4, seed=1)
    cache.write_shard("train-000000", "train-000000.tar", keys, params, targets, bad=[])
    assert cache.read_shard("train-000000")["keys"] == keys


@pytest.mark.parametrize("content", [b"", b'{"shard_id": "train-000000", "url": "x', b"[]", b'{"shard_id": "x"}'])
def test_torn_or_invalid_marker_is_incomplete(cache, tmp_path, content):
    cache.write_shard("train-000000", "train-000000.tar", *_shard(5), bad=[])
    (tmp_path / "cache.zarr" / "complete" / "train-000000" / "zarr.json").write_bytes(content)
    assert not cache.is_complete("train-000000") and cache.completed() == {}
    with pytest.raises(UserError, match="not complete"):
        cache.read_shard("train-000000")


def test_marker_is_written_last_and_leaves_no_temporary_files(cache, tmp_path, monkeypatch):
    written = []
    original = CacheStore._write_marker

    def spy(self, shard_id, marker, node=None):
        written.append(sorted(_files(tmp_path / "cache.zarr")))
        original(self, shard_id, marker, node)

    monkeypatch.setattr(CacheStore, "_write_marker", spy)
    cache.write_shard("train-000000", "train-000000.tar", *_shard(5), bad=[])
    assert any(f.endswith("targets/patches/scale/c/0/0/0/0") for f in written[0])  # arrays were already there
    assert not any(f.startswith("complete/train") for f in written[0])
    assert sorted(f for f in _files(tmp_path / "cache.zarr") if f.startswith("complete")) == \
        ["complete/train-000000/zarr.json", "complete/zarr.json"]


def test_rewriting_a_complete_shard_removes_its_marker_first(cache, monkeypatch):
    cache.write_shard("train-000000", "train-000000.tar", *_shard(5), bad=[])

    def killed(self, shard_id, marker, node=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(CacheStore, "_write_marker", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.write_shard("train-000000", "train-000000.tar", *_shard(6, seed=3), bad=[])
    assert not cache.is_complete("train-000000")


def test_shard_id_collision_is_refused(cache):
    cache.write_shard("train-000000", "a/train-000000.tar", *_shard(2), bad=[])
    with pytest.raises(UserError, match="both map to shard id"):
        cache.write_shard("train-000000", "b/train-000000.tar", *_shard(2), bad=[])


def test_verify_detects_tampering(cache, tmp_path):
    cache.write_shard("train-000000", "train-000000.tar", *_shard(5), bad=[], digests=_digests(5))
    path = tmp_path / "cache.zarr" / "complete" / "train-000000" / "zarr.json"
    node = json.loads(path.read_text())
    node["attributes"]["checksums"]["params"] = "0" * 64
    path.write_text(json.dumps(node))
    assert cache.verify_shard("train-000000") == ["train-000000: checksum mismatch in params"]
    # a corrupt shard object fails to decode
    obj = tmp_path / "cache.zarr" / "shards" / "train-000000" / "targets" / "logits" / "values" / "c" / "0" / "0" / "0"
    obj.write_bytes(b"garbage" * 10)
    problems = cache.verify_shard("train-000000")
    assert any("targets/logits/values" in p for p in problems)
    # a deleted array
    import shutil

    shutil.rmtree(tmp_path / "cache.zarr" / "shards" / "train-000000" / "keys")
    assert "train-000000: missing array keys" in cache.verify_shard("train-000000")


def test_create_refuses_other_attrs_reopens_same_and_overwrites(tmp_path):
    url = str(tmp_path / "cache.zarr")
    first = CacheStore.create(url, _attrs())
    first.write_shard("train-000000", "train-000000.tar", *_shard(3), bad=[])
    resumed = CacheStore.create(url, _attrs(plan__bytes_per_sample=999))  # plan is not compared
    assert resumed.is_complete("train-000000") and resumed.attrs["created"] == first.attrs["created"]
    with pytest.raises(UserError, match=r"teacher.weights_sha256 differs.*--overwrite"):
        CacheStore.create(url, _attrs(teacher__weights_sha256="cd" * 32))
    with pytest.raises(UserError, match=r"view.seed differs: cache has 0, expected 1"):
        CacheStore.create(url, _attrs(view__seed=1))
    other_targets = _attrs()
    del other_targets["targets"]["patches"]
    with pytest.raises(UserError, match="targets differ: the cache also has patches"):
        CacheStore.create(url, other_targets)
    wiped = CacheStore.create(url, _attrs(view__seed=1), overwrite=True)
    assert wiped.attrs["view"]["seed"] == 1
    assert wiped.completed() == {} and wiped.shards_present() == []
    assert [p.name for p in (tmp_path / "cache.zarr" / "complete").iterdir()] == ["zarr.json"]


def test_create_and_open_refuse_what_is_not_a_cache(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not a kt cache"):
        CacheStore.create(str(tmp_path / "photos"), _attrs(), overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").exists()
    with pytest.raises(UserError, match="no kt cache"):
        CacheStore.open(str(tmp_path / "missing.zarr"))
    with pytest.raises(UserError, match="no kt cache"):
        CacheStore.open(str(tmp_path / "photos"))
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(UserError, match="not a kt cache"):
        CacheStore.open(str(tmp_path / "plain.zarr"))
    with pytest.raises(UserError, match="not a kt cache"):
        CacheStore.create(str(tmp_path / "plain.zarr"), _attrs(), overwrite=True)


def test_read_only_open_and_other_rank_writer(cache):
    reader = CacheStore.open(cache.url)
    with pytest.raises(Exception):
        reader.write_shard("train-000001", "train-000001.tar", *_shard(2), bad=[])
    writer = CacheStore.open(cache.url, mode="r+")
    writer.write_shard("train-000001", "train-000001.tar", *_shard(2), bad=[], rank=1)
    assert cache.completed()["train-000001"]["rank"] == 1


def test_codec_state_round_trip(cache):
    codec = parse_codec("pca:d=4,int8", "patches")
    x = np.random.default_rng(0).normal(size=(3, 2, 2, 8)).astype(np.float32)
    codec.fit(x)
    assert cache.read_codec_state("patches") is None
    cache.write_codec_state("patches", *codec.state())
    attrs, arrays = CacheStore.open(cache.url).read_codec_state("patches")
    restored = type(codec).from_state(attrs, arrays)
    np.testing.assert_array_equal(restored.decode(codec.encode(x)), codec.decode(codec.encode(x)))


def test_half_written_codec_state_reads_as_absent(cache):
    """A kill after the PCA arrays but before the attributes leaves a state the build refits, not one it trusts."""
    codec = parse_codec("pca:d=4,int8", "patches")
    codec.fit(np.random.default_rng(0).normal(size=(3, 2, 2, 8)).astype(np.float32))
    attrs, arrays = codec.state()
    group = cache.group.create_group("codecs/patches", overwrite=True)
    group.create_array("mean", data=arrays["mean"])  # killed here: no basis, no attributes
    assert cache.read_codec_state("patches") is None
    cache.write_codec_state("patches", attrs, arrays)
    assert cache.read_codec_state("patches") is not None


def test_a_damaged_codec_state_is_refused_not_decoded(cache):
    """The PCA basis decodes every patch target of every shard: a changed value (a flipped bit that still
    decodes) is refused on reading, with one line, and named by verify_codec_states."""
    codec = parse_codec("pca:d=4,int8", "patches")
    codec.fit(np.random.default_rng(0).normal(size=(3, 2, 2, 8)).astype(np.float32))
    attrs, arrays = codec.state()
    cache.write_codec_state("patches", attrs, arrays)
    assert cache.verify_codec_states() == []
    read_attrs, read_arrays = cache.read_codec_state("patches")
    assert "checksums" not in read_attrs and read_attrs.keys() == _jsonable(attrs).keys()
    basis = cache.group["codecs/patches/basis"]
    flipped = basis[...].copy()
    flipped.view(np.uint32)[3, 1] ^= 1 << 30  # an exponent bit: finite, and off by orders of magnitude
    basis[...] = flipped
    with pytest.raises(UserError, match=r"the codec state of patches is damaged \(basis: checksum mismatch\)"):
        cache.read_codec_state("patches")
    with pytest.raises(UserError, match="codec state of patches is damaged"):
        cache.load_codecs()
    assert cache.verify_codec_states() == ["the codec state of patches is damaged (basis: checksum mismatch); "
                                           "rebuild the cache (kt-cache build --overwrite)"]


@pytest.mark.parametrize(
    "expected,message",
    [
        ({"teacher": {"arch": "vit_small_patch14_dinov2"}},
         "teacher.arch differs: cache has 'tf_efficientnet_lite0'"),
        ({"teacher": {"classes": ["cat", "dog", "emu"]}},
         r"teacher.classes\[2\] differs: cache has 'owl', expected 'emu'"),
        ({"teacher": {"classes": ["cat", "dog"]}}, "teacher.classes length differs: cache has 3, expected 2"),
        ({"view": {"spec": {"crop_scale": [0.08, 1.0], "flip": True}}}, r"view.spec.crop_scale\[0\] differs"),
        ({"view": {"spec": {"crop_scale": [0.2, 1.0], "flip": True, "jitter": 0.4}}},
         "view.spec.jitter differs: cache has nothing"),
        ({"view": {"views_per_image": 4}}, "view.views_per_image differs: cache has 2, expected 4"),
        ({"targets": {"embedding": {}}}, "the cache has no target 'embedding' \\(it has: logits, patches\\)"),
        ({"targets": {"logits": {"codec": "fp16"}}},
         "targets.logits.codec differs: cache has 'topk:k=2', expected 'fp16'"),
    ],
)
def test_check_compatible_names_the_difference(expected, message):
    with pytest.raises(UserError, match=message):
        check_compatible(_attrs(), expected)


def test_check_compatible_accepts_subsets_and_json_forms():
    check_compatible(_attrs(), {"teacher": {"classes": ("cat", "dog", "owl"), "image_size": 224},
                                "view": {"seed": 0}, "targets": {"logits": {"codec": "topk:k=2"}}})
    with pytest.raises(UserError, match="teacher.image_size differs"):
        check_compatible(_attrs(), {"teacher": {"image_size": 224.5}})


@pytest.mark.parametrize(
    "url,shard_id",
    [
        ("/data/train-000003.tar", "train-000003"),
        ("s3://bucket/fmnist/train-000003.tar.gz", "train-000003"),
        ("https://host/x/shard_07.tgz?token=abc", "shard_07"),
        ("pipe:curl -s http://h/a b.tar", "a_b"),
        ("train 1.tar", "train_1"),
    ],
)
def test_shard_id_for(url, shard_id):
    assert shard_id_for(url) == shard_id


def test_memory_url_round_trip_and_resume():
    url = f"memory://kt-test-{uuid.uuid4().hex}/cache.zarr"
    cache = CacheStore.create(url, _attrs())
    keys, params, targets = _shard(6)
    cache.write_shard("train-000000", "train-000000.tar", keys, params, targets, bad=[], digests=_digests(6))
    reopened = CacheStore.open(url)
    assert reopened.read_shard("train-000000")["keys"] == keys
    assert reopened.verify_shard("train-000000") == []
    assert CacheStore.create(url, _attrs()).is_complete("train-000000")
    reopened._fs.pipe_file(reopened._marker_path("train-000000"), b'{"trunc')
    assert not reopened.is_complete("train-000000")
    assert reopened.nbytes_stored() > 0
    with pytest.raises(UserError, match="no kt cache"):
        CacheStore.open(f"memory://kt-test-{uuid.uuid4().hex}/none.zarr")


def test_file_url(tmp_path):
    url = (tmp_path / "cache.zarr").as_uri()
    cache = CacheStore.create(url, _attrs())
    cache.write_shard("train-000000", "train-000000.tar", *_shard(2), bad=[])
    assert CacheStore.open(str(tmp_path / "cache.zarr")).is_complete("train-000000")


def test_load_codecs_decodes_stored_parts(cache):
    codec = parse_codec("pca:d=4,int8", "patches")
    x = np.random.default_rng(1).normal(size=(3, V, 2, 2, 8)).astype(np.float32)
    codec.fit(x)
    cache.write_codec_state("patches", *codec.state())
    logits = np.random.default_rng(2).normal(size=(3, V, 3)).astype(np.float32)
    topk = parse_codec("topk:k=2", "logits")
    targets = {"logits": topk.encode(logits), "patches": codec.encode(x)}
    cache.write_shard("train-000000", "train-000000.tar", ["a", "b", "c"], np.zeros((3, V, P)), targets, bad=[])
    codecs = CacheStore.open(cache.url).load_codecs()
    stored = cache.read_shard("train-000000")["targets"]
    np.testing.assert_array_equal(codecs["logits"].decode(stored["logits"]), topk.decode(targets["logits"]))
    np.testing.assert_array_equal(codecs["patches"].decode(stored["patches"]), codec.decode(targets["patches"]))


def test_full_disk_is_a_user_error_and_leaves_the_shard_incomplete(cache, monkeypatch):
    import errno

    import kt.teacher_cache.store as store

    calls = []

    def full_after_two(group, path, value):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(group, path, value)

    original = store._write_array
    monkeypatch.setattr(store, "_write_array", full_after_two)
    with pytest.raises(UserError, match="no space left.*train-000000"):
        cache.write_shard("train-000000", "train-000000.tar", *_shard(3), bad=[])
    assert not cache.is_complete("train-000000")


_WRITER = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_store import _digests, _shard
from kt.teacher_cache.store import CacheStore
cache = CacheStore.open({url!r}, mode="r+")
print("ready", flush=True)
for i in range(10_000):
    cache.write_shard(f"train-{{i:06d}}", f"train-{{i:06d}}.tar", *_shard(50, seed=i % 7), bad=[],
                      digests=_digests(50))
"""


@pytest.mark.parametrize("delay", [0.3])
def test_sigkill_mid_write_leaves_only_verifiable_complete_shards(tmp_path, delay):
    import subprocess
    import sys
    import time
    from pathlib import Path

    url = str(tmp_path / "cache.zarr")
    CacheStore.create(url, _attrs())
    tests = str(Path(__file__).resolve().parent)
    script = _WRITER.format(tests=tests, url=url)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=Path(tests).parent, stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    child.kill()
    child.wait()
    cache = CacheStore.open(url)
    complete = cache.completed()
    for shard_id in complete:
        assert cache.verify_shard(shard_id) == []
        assert len(cache.read_shard(shard_id)["keys"]) == 50
    for shard_id in set(cache.shards_present()) - set(complete):
        with pytest.raises(UserError, match="not complete"):
            cache.read_shard(shard_id)
