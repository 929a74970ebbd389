"""Parallel writer threads (`--writer-threads`): the store is bit for bit the one a single writer makes."""

from __future__ import annotations

import numpy as np
import pytest

from kt.teacher_cache.cli import main
from kt.teacher_cache.store import CacheStore
from tests.test_cache_cli import assert_same_store, small_shards  # noqa: F401 -- the fixture, shared
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


def test_writer_in_the_teachers_thread_writes_the_same_store(tiny_teacher, small_shards, tmp_path):  # noqa: F811
    for threads in (0, 1):
        args = build_args(tiny_teacher, small_shards[:2], tmp_path / f"w{threads}.zarr", "--writer-threads",
                          str(threads), "--codec", "patches=pca:d=16,int8", views=2)
        args[args.index("--batch-size") + 1] = "5"
        assert main(args) == 0
    assert_same_store(tmp_path / "w0.zarr", tmp_path / "w1.zarr")


def test_writer_threads_below_auto_are_refused(tiny_teacher, fmnist, tmp_path, capsys):  # noqa: F811
    args = build_args(tiny_teacher, fmnist["train"][:1], tmp_path / "x.zarr", "--writer-threads", "-2")
    assert main(args) == 2
    assert "--writer-threads -2: must be >= -1" in capsys.readouterr().err


def test_default_writer_works_in_the_teachers_thread_on_cpu_and_beside_a_gpu():
    import torch

    from kt.teacher_cache.build import BuildConfig, writer_threads

    assert writer_threads(BuildConfig(), torch.device("cpu")) == 0
    assert writer_threads(BuildConfig(), torch.device("cuda", 0)) == 1
    assert writer_threads(BuildConfig(writer_threads=3), torch.device("cpu")) == 3


def test_default_writer_has_threads_for_heavy_targets_beside_a_gpu(monkeypatch):
    """Patch tokens (when not encoded on the GPU) or per-pixel logits: one thread encodes slower than a GPU
    teacher forwards (docs), so three, within a quarter of the cores; light targets keep one; an explicit count
    is kept."""
    import os

    import torch

    from kt.teacher_cache.build import BuildConfig, writer_threads

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert writer_threads(BuildConfig(targets=["logits", "embedding"]), gpu) == 1
    assert writer_threads(BuildConfig(targets=["logits", "patches"]), gpu) == 1  # encoded on the GPU
    assert writer_threads(BuildConfig(targets=["logits", "patches"], device_encode="off"), gpu) == 3
    assert writer_threads(BuildConfig(targets="seg_logits"), gpu) == 3
    assert writer_threads(BuildConfig(targets=["patches"]), torch.device("cpu")) == 0
    assert writer_threads(BuildConfig(targets=["patches"], writer_threads=1), gpu) == 1
    host = dict(device_encode="off")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert writer_threads(BuildConfig(targets=["patches"], **host), gpu) == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert writer_threads(BuildConfig(targets=["patches"], **host), gpu) == 1


def test_codecs_are_fitted_on_the_builds_own_views(tiny_teacher, small_shards, tmp_path, monkeypatch):  # noqa: F811
    """A single-process build fits PCA on the first views of its own stream: no second teacher pass, and the
    basis `fit_codecs` (the separate pass several processes use) gets from the same data. Two workers
    interleave the shards' batches, and the fit views span two shards."""
    from kt.checkpoints import load_model
    from kt.teacher_cache import build
    from kt.teacher_cache.codecs import parse_codec
    from kt.views import ViewSet, load_view_spec

    forwarded = []
    real = build.launch_teacher  # every teacher forward of the build goes through it

    def counting(model, x, targets, place=None, encoders=None):
        forwarded.append(len(x))
        return real(model, x, targets, place, encoders)

    monkeypatch.setattr(build, "launch_teacher", counting)
    out = tmp_path / "c.zarr"
    args = build_args(tiny_teacher, small_shards, out, "--codec", "patches=pca:d=16,int8", views=2)
    args[args.index("--fit-views") + 1] = "40"  # shard 0 gives 24 views: the fit needs shard 1 too
    args[args.index("--batch-size") + 1] = "5"
    args[args.index("--workers") + 1] = "2"
    assert main(args) == 0
    assert forwarded[0] == 1  # the item shapes' probe
    assert sum(forwarded[1:]) == 4 * 12 * 2  # then every view once, none again for the fit

    model = load_model(tiny_teacher, image_size=32).eval()
    fitted = {"patches": parse_codec("pca:d=16,int8", "patches")}
    build.fit_codecs(model, fitted, small_shards, ViewSet(load_view_spec("light"), 0, 2), 32, 5, 40)
    _, stored = CacheStore.open(str(out)).read_codec_state("patches")
    _, expected = fitted["patches"].state()
    assert sorted(stored) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(stored[name], expected[name])


def test_build_benchmark_separates_the_fixed_cost_from_the_per_view_ratio():
    """build = fixed + per_view x views at two sizes, with known costs: the separation gives them back exactly."""
    from tools.bench_cache import separate_fixed_cost

    def forward(views):
        return 0.5 + 0.010 * views

    def build(views):
        return 2.0 + 0.012 * views

    got = separate_fixed_cost(100, forward(100), build(100), 300, forward(300), build(300))
    assert got == {"marginal_build_over_forward": 1.2, "build_fixed_s": 2.0, "forward_fixed_s": 0.5}


@pytest.mark.slow
def test_build_benchmark_times_two_sizes(fmnist, tmp_path):
    """The benchmark end to end on tiny shards. Its timings are only checked for being there: this runs beside
    other tests, where a ratio of two timings means nothing (the arithmetic is tested above)."""
    from tools import bench_cache

    result = bench_cache.run(["--data", str(fmnist["root"] / "train"), "--build-shards", "1", "--large-shards", "3",
                              "--repeats", "1", "--skip", "fidelity,reader", "--image-size", "32",
                              "--batch-size", "50", "--workers", "0", "--workdir", str(tmp_path)])
    build = result["build"]
    assert build["views"] == 100 and build["large_views"] == 300
    assert len(build["forward_s"]) == len(build["build_s"]) == len(build["large_build_s"]) == 1
    assert all(t > 0 for key in ("forward_s", "build_s", "large_forward_s", "large_build_s") for t in build[key])
    assert {"marginal_build_over_forward", "build_fixed_s", "forward_fixed_s"} <= set(build)


@pytest.mark.parametrize("shuffled,bad_row", [(False, None), (True, None), (False, 2), (True, 2)])
def test_assembler_orders_rows_and_drops_bad_samples(shuffled, bad_row):
    """A shard's (N, V, ...) arrays come out in (sample, view) order with non-finite samples dropped, whether
    batches arrive in order (the copy-free path) or not (threads), with or without a bad sample."""
    from kt.teacher_cache.codecs import Fp16Codec
    from kt.teacher_cache.writer import ShardAssembler, ShardEnd, TeacherBatch
    from kt.views import PARAM_DIM

    n, views = 5, 2
    codec = Fp16Codec("embedding")
    codec.item_shape = (3,)
    rows, vs = np.repeat(np.arange(n), views), np.tile(np.arange(views), n)
    raw = (rows * 10 + vs)[:, None] + np.arange(3)[None, :] / 4  # every view's values name their (row, view)
    raw = raw.astype(np.float32)
    params = np.repeat((rows * 10 + vs)[:, None], PARAM_DIM, 1).astype(np.float32)
    if bad_row is not None:
        raw[rows == bad_row] = np.nan
    assembler = ShardAssembler(views, {"embedding": codec})
    batches = [slice(0, 4), slice(4, 7), slice(7, 10)]
    for b in (batches[::-1] if shuffled else batches):
        x = raw[b]
        assembler.add(TeacherBatch("u", rows[b], vs[b], params[b], {"embedding": x}, np.isfinite(x).all(1)))
    keys = [f"k{i}" for i in range(n)]
    shard = assembler.finish(ShardEnd("u", keys, np.arange(n, dtype=np.uint64), [], n))
    good = [i for i in range(n) if i != bad_row]
    assert shard.keys == [keys[i] for i in good]
    np.testing.assert_array_equal(shard.digests, np.array(good, dtype=np.uint64))
    expected = raw.reshape(n, views, 3)[good].astype(np.float16)
    np.testing.assert_array_equal(shard.targets["embedding"]["values"], expected)
    np.testing.assert_array_equal(shard.params[..., 0], params[:, 0].reshape(n, views)[good])
    assert [b["key"] for b in shard.bad] == ([] if bad_row is None else [keys[bad_row]])


# ------------------------------------------------------------------------------- encoding on the device
@pytest.mark.parametrize("codec", ["int8", "fp16", "pca:d=16,int8"])
def test_patches_encoded_where_the_teacher_runs_give_the_host_encoded_store(tiny_teacher, fmnist, tmp_path, codec,  # noqa: F811
                                                                          monkeypatch):
    """`--device-encode on` (the default on CUDA; here the "device" is the CPU, the same torch code): the store
    equals the host-encoded one: int8 and fp16 byte for byte, a PCA projection within one int8 step (a float32
    matmul in another summation order), its scales to float32 precision. Every view is encoded on the device,
    those held raw for the PCA fit too."""
    from kt.teacher_cache import build
    from tests.test_cache_cli import arrays

    encoded = []  # the patch views each build encoded where the teacher ran
    real = build.encode_outputs
    monkeypatch.setattr(build, "encode_outputs", lambda out, encs: encoded.append(len(out["patches"])) or real(out, encs))
    stores, counts = {}, {}
    for mode in ("off", "on"):
        out = tmp_path / f"{mode}.zarr"
        args = build_args(tiny_teacher, fmnist["train"][:1], out, "--codec", f"patches={codec}", "--device-encode", mode,
                          views=1)
        encoded.clear()
        assert main(args) == 0
        stores[mode], counts[mode] = arrays(out), sum(encoded)
    views = len(stores["off"][next(p for p in stores["off"] if p.endswith("/keys"))])
    assert counts == {"off": 0, "on": views}
    host, device = stores["off"], stores["on"]
    assert sorted(host) == sorted(device)
    for path in host:
        a, b = host[path], device[path]
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if "patches/coeffs" in path:
            assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1, path
            assert (a != b).mean() < 0.01, path
        elif "patches/scale" in path and codec.startswith("pca"):
            np.testing.assert_allclose(a, b, rtol=1e-5)
        elif not path.endswith("/checksums") or not codec.startswith("pca"):
            assert np.array_equal(a, b), path


def test_a_fresh_build_encodes_its_fit_views_as_a_resumed_one_does(tiny_teacher, fmnist, tmp_path, monkeypatch):  # noqa: F811
    """The views a fresh single-process build holds raw for its codec fit are encoded on the device like the
    rest, so it writes what a build resumed after the fit (codecs read from the store, every view encoded on
    the device) writes, byte for byte, though host and device encoders differ in the last bits (made visible
    here: the device's int8 scales are nudged by one part in a million)."""
    from kt.teacher_cache import device_encode
    from tests.test_cache_cli import arrays

    real = device_encode.quantize_int8
    monkeypatch.setattr(device_encode, "quantize_int8", lambda x: (lambda q, s: (q, s * (1 + 2 ** -20)))(*real(x)))
    out = tmp_path / "fresh.zarr"
    args = build_args(tiny_teacher, fmnist["train"][:1], out, "--codec", "patches=pca:d=16,int8",
                      "--device-encode", "on", "--batch-size", "16", views=1)
    assert main(args) == 0
    fresh = arrays(out)
    # the same store resumed after its codec fit: the shards' completion removed, the codec states kept
    for marker in (out / "complete").glob("*/zarr.json"):
        marker.unlink()
    assert main(args) == 0
    resumed = arrays(out)
    assert sorted(fresh) == sorted(resumed)
    for path in fresh:
        assert np.array_equal(fresh[path], resumed[path]), path


def test_device_encoders_cover_the_heavy_targets_whose_codec_has_a_torch_twin():
    import torch

    from kt.teacher_cache.codecs import parse_codec
    from kt.teacher_cache.device_encode import encoders

    codecs = {"logits": parse_codec("topk:k=3", "logits"), "embedding": parse_codec("fp16", "embedding"),
              "patches": parse_codec("int8", "patches")}
    assert set(encoders(codecs, ["logits", "embedding", "patches"], torch.device("cpu"))) == {"patches"}
    unfitted = {"patches": parse_codec("pca:d=4,int8", "patches")}  # no basis yet: the host encodes
    assert encoders(unfitted, ["patches"], torch.device("cpu")) == {}
    auto = parse_codec("auto", "patches")
    auto.fit(np.random.default_rng(0).standard_normal((8, 2, 2, 16)).astype(np.float32))
    assert set(encoders({"patches": auto}, ["patches"], torch.device("cpu"))) == {"patches"}
