"""The build's data path: uint8 views normalised on the consumer's device equal float views made in the
workers, and the build's clock (where its time goes, the steady rate without start-up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kt.render import normalize, to_tensor, to_uint8
from tests.test_reader import tiny_teacher  # noqa: F401 -- the fixture, shared
from kt.teacher_cache.build import BuildClock, ShardViewBatches, ViewBatch
from kt.views import ViewSet, load_view_spec
from tests.test_cache_cli import small_shards  # noqa: F401 -- the fixture, shared

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_uint8_views_normalised_later_equal_the_workers_float_views(small_shards):  # noqa: F811
    view_set = ViewSet(load_view_spec("train"), 0, 2)
    kw = dict(urls=small_shards[:1], view_set=view_set, image_size=40, mean=MEAN, std=STD, batch_size=7)
    f32 = [b for b in ShardViewBatches(**kw) if isinstance(b, ViewBatch)]
    u8 = [b for b in ShardViewBatches(**kw, uint8=True) if isinstance(b, ViewBatch)]
    assert len(f32) == len(u8) == 4  # 12 images x 2 views in batches of 7
    for a, b in zip(f32, u8):
        assert a.x.dtype == torch.float32 and b.x.dtype == torch.uint8 and b.x.shape == a.x.shape
        np.testing.assert_array_equal(a.params, b.params)
        assert torch.equal(normalize(b.x, MEAN, STD), a.x)  # bit for bit: the same two float32 operations


def test_normalize_is_to_tensor_for_one_view_and_for_a_batch():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(3)]
    from PIL import Image

    views = [Image.fromarray(a) for a in images]
    expect = torch.stack([to_tensor(v, MEAN, STD) for v in views])
    u8 = torch.stack([to_uint8(v) for v in views])
    assert u8.is_contiguous() and torch.equal(u8.permute(0, 2, 3, 1), torch.from_numpy(np.stack(images)))
    assert torch.equal(normalize(u8, MEAN, STD), expect)
    # the reference arithmetic, (x / 255 - mean) / std, within float32 rounding
    ref = (u8.double() / 255 - torch.tensor(MEAN).double().view(3, 1, 1)) / torch.tensor(STD).double().view(3, 1, 1)
    torch.testing.assert_close(expect.double(), ref, rtol=0, atol=1e-6)


def test_build_clock_splits_the_loop_and_leaves_start_up_out_of_the_steady_rate(monkeypatch):
    import kt.teacher_cache.build as build

    now = iter([0.0,  # start
                2.0, 2.5, 2.6,  # first batch: 2 s waiting on the workers, 0.5 s teacher, 0.1 s writer
                2.7, 3.2, 3.3,  # then per batch: 0.1 s wait, 0.5 s teacher, 0.1 s writer
                3.4, 3.9, 4.0,
                4.1, 4.5,  # end of data (0.1 s), the writer's final flush (0.4 s)
                9.0])  # a clock that saw no batch
    monkeypatch.setattr(build.time, "perf_counter", lambda: next(now))
    clock = BuildClock()
    batches = iter([1, 2, 3])
    n = 0
    while clock.next(batches) is not None:
        clock.lap("teacher", 64)
        n += 64
        clock.lap("writer")
    clock.lap("writer")
    out = clock.summary(n)
    assert out["time_s"] == {"loader_wait": 2.3, "teacher": 1.5, "teacher_wait": 0.0, "writer": 0.7,
                           "first_batch": 2.5}
    assert clock.elapsed == 4.5
    # 128 views after the first batch, in the 2.0 s after it was through the teacher
    assert abs(out["steady_views_per_s"] - 128 / 2.0) < 1e-9
    assert BuildClock().summary(0)["steady_views_per_s"] == 0.0


def test_gpu_benchmark_runs_its_build_part_on_the_cpu_at_toy_sizes(capsys):
    """`python -m tools.bench gpu --device cpu --tiny`: the code path the GPU run takes, with the build's clock;
    on a CPU only the default variant runs (no CUDA render, no uint8 hand-off)."""
    from tools.bench_gpu import build_parser, run

    out = run(build_parser().parse_args(["--device", "cpu", "--tiny", "--build-only"]))
    build = out["build"]
    assert build["input"] == "500x375 JPEG q95" and set(build) >= {"pil_uint8", "patches_pca_host"}
    assert "pil_float" not in build and "patches_pca" not in build  # they need CUDA
    assert build["patches_pca_host"]["targets"] == ["logits", "embedding", "patches"]
    row = build["pil_uint8"]
    assert row["views"] == 128 * 2 and row["teacher_dtype"] == "float32"
    assert set(row["time_s"]) == {"loader_wait", "teacher", "teacher_wait", "writer", "first_batch"}
    assert row["steady_views_per_s"] > 0 and row["views_per_s"] > 0
    assert "distill" not in out and "render" not in out  # --build-only


def test_gpu_benchmark_times_training_with_the_device_render_beside_the_pil_workers():
    """The distill part at toy sizes on the CPU: the cached student's steps with PIL-rendered views and with
    `--render cuda`'s path (workers decode, `render_sources` renders), the figure `--render auto` waits for."""
    from tools.bench_gpu import build_parser, run

    out = run(build_parser().parse_args(["--device", "cpu", "--tiny", "--no-seg"]))["distill"]
    assert out["timed_steps_per_mode"] == 3
    for key in ("cached_steps_per_s", "cached_render_steps_per_s", "online_steps_per_s"):
        assert out[key] > 0, key
    assert out["device_render_speedup"] == pytest.approx(out["cached_render_steps_per_s"] / out["cached_steps_per_s"])


def test_writer_benchmark_reports_small_shards_and_the_fixed_cost_per_shard(tmp_path):
    """`bench pipeline`'s writer part also writes shards of 128 views: a shard's fixed cost (zarr metadata of
    its arrays) is what bounded a GPU build on shards of 64 images (docs/benchmarks.md)."""
    import argparse

    from tools.bench_pipeline import bench_writer

    out = bench_writer(argparse.Namespace(writer_views=256, writer_threads="1"), str(tmp_path))
    assert set(out) == {"logits", "logits+embedding", "logits+embedding+patches"}
    for row in out.values():
        assert row["views"] == 1024 and row["views_per_s_per_thread"] > 0
        assert row["views_per_s_per_thread_small_shards"] > 0 and isinstance(row["shard_fixed_ms"], float)


def test_render_benchmark_times_an_earlier_revision_of_the_render():
    """`bench pipeline --render-before REV` times kt/render.py as it was at REV against today's, in one run:
    the module really is that revision's file, and renders the same views."""
    import subprocess

    from kt.render import decode_for_views, render
    from kt.views import VIEW_PRESETS, sample_params
    from tools.bench_pipeline import encode, photos_500x375, render_at_revision, run

    root = Path(__file__).resolve().parent.parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    earlier = render_at_revision("HEAD")
    expect = subprocess.run(["git", "show", "HEAD:kt/render.py"], cwd=root, check=True, capture_output=True,
                            text=True).stdout
    assert Path(earlier.__file__).read_text() == expect
    data = encode(photos_500x375(1)[0], "JPEG")
    for i in range(8):
        p = sample_params(VIEW_PRESETS["train"], 0, f"k{i}", 0)
        a = np.asarray(earlier.render(earlier.decode_for_views(data, p, 64), p, 64), dtype=float)
        b = np.asarray(render(decode_for_views(data, p, 64), p, 64), dtype=float)
        assert np.abs(a - b).mean() < 1.0
    out = run(["--quick", "--views", "4", "--skip", "render_gpu,writer,build,stream", "--render-before", "HEAD"])
    assert out["render"]["train_224px_jpeg"]["after_over_before"] > 0
    with pytest.raises(SystemExit, match="no kt/render.py at that revision"):
        render_at_revision("no-such-revision")


def test_zero_teacher_build_benchmark_separates_the_first_build_and_reports_the_loop(tmp_path):
    import argparse

    from tools.bench_pipeline import bench_build, photo_shards

    urls = photo_shards(tmp_path / "photos", 16)
    out = bench_build(argparse.Namespace(size=32, build_views=1, workers=0), urls, str(tmp_path / "z.zarr"))
    assert out["views"] == 16 and out["images"] == 16
    assert out["over_loader"] > 0 and out["over_loader_first_build"] > 0 and out["loop_views_per_s"] > 0
    assert set(out["time_s"]) == {"loader_wait", "teacher", "teacher_wait", "writer", "first_batch"}


def test_replay_benchmark_builds_the_store_the_real_data_path_builds(tmp_path):
    """`bench pipeline`'s build_replay replays views rendered beforehand: the store it writes is the one the
    real loader's build writes (the same teacher), so the loop it times is the build's own."""
    import argparse

    from tests.test_cache_cli import assert_same_store
    from tools.bench_pipeline import bench_build, bench_build_replay, photo_shards

    urls = photo_shards(tmp_path / "photos", 16)
    args = argparse.Namespace(size=32, build_views=2, workers=0)
    out = bench_build_replay(args, urls, str(tmp_path / "replay.zarr"))
    assert out["views"] == 32 and out["views_per_s"] > 0 and out["cpu_ms_per_view"] > 0
    assert set(out["time_s"]) == {"loader_wait", "teacher", "teacher_wait", "writer", "first_batch"}
    bench_build(args, urls, str(tmp_path / "real.zarr"))
    assert_same_store(tmp_path / "real.zarr", tmp_path / "replay.zarr")


def test_a_teacher_that_cannot_be_captured_runs_eagerly_with_a_warning(monkeypatch):
    """`GraphedTeacher.capture` never fails a build: a model whose forward cannot be captured (it syncs with
    the host, say) leaves the eager teacher, with one warning."""
    import warnings

    from kt.device import placement
    from kt.teacher_cache.build import GraphedTeacher

    def refuse(self, *args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedTeacher, "__init__", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert GraphedTeacher.capture(object(), ["logits"], placement("cpu"), 8, 32) is None
    assert len(caught) == 1 and "could not be captured as a CUDA graph" in str(caught[0].message)
    assert "operation not permitted" in str(caught[0].message)


def test_gil_probe_times_the_teacher_alone_and_beside_busy_threads():
    """`python -m tools.bench gpu --gil-probe` at toy sizes on the CPU (eager only: graphs need CUDA)."""
    import sys

    from tools.bench_gpu import build_parser, run

    interval = sys.getswitchinterval()
    out = run(build_parser().parse_args(["--device", "cpu", "--tiny", "--gil-probe"]))["gil_probe"]
    assert sys.getswitchinterval() == interval  # restored
    assert set(out["eager"]) == {"alone", "beside_python_loop_switch_5ms", "beside_python_loop_switch_0.5ms",
                                 "beside_numpy_small_switch_5ms", "beside_numpy_small_switch_0.5ms"}
    assert all(r["images_per_s"] > 0 and r["launch_ms_per_batch"] > 0 for r in out["eager"].values())
    assert "graph" not in out


def test_teacher_outputs_reach_the_writer_contiguous():
    """A CNN's patch grid is a channels-last view of its NCHW features; the writer's codecs get it contiguous
    (they reduce along the last axis, ~10x slower strided), with the same values."""
    from kt.models import create_model, teacher_targets
    from kt.teacher_cache.build import teacher_outputs

    model = create_model("test_efficientnet", num_classes=3, image_size=64).eval()  # a 2x2 grid
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fresh = teacher_targets(model, x, ["patches", "embedding", "logits"])
    assert not fresh["patches"].is_contiguous()  # what made this test worth writing
    out = teacher_outputs(model, x, ["patches", "embedding", "logits"])
    for name, array in out.items():
        assert array.flags["C_CONTIGUOUS"], name
        np.testing.assert_array_equal(array, fresh[name].numpy())


def test_the_build_names_what_bounded_it():
    """`bottleneck`: the share of the loop (after the first batch) spent waiting on the DataLoader or in the writer
    names the limit and the knob to turn; a teacher-bound or a short loop says nothing."""
    from kt.teacher_cache.build import BuildConfig, bottleneck, writer_threads

    cfg = BuildConfig(workers=2)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    data_bound = {"loader_wait": 45.0, "teacher": 40.0, "teacher_wait": 5.0, "writer": 5.0, "first_batch": 5.0}
    bound, hint = bottleneck(data_bound, 100.0, cfg, cuda, device_render=False)
    assert bound == "data" and "--workers (now 2" in hint and "--render cuda" in hint and "plan --measure" in hint
    assert "--render cuda" not in bottleneck(data_bound, 100.0, cfg, cuda, device_render=True)[1]
    assert "--render cuda" not in bottleneck(data_bound, 100.0, cfg, cpu, device_render=False)[1]
    writer_bound = {"loader_wait": 6.0, "teacher": 50.0, "teacher_wait": 5.0, "writer": 40.0, "first_batch": 5.0}
    bound, hint = bottleneck(writer_bound, 100.0, cfg, cuda, device_render=False)
    assert bound == "writer" and "--writer-threads (now 1)" in hint
    off = BuildConfig(workers=2, device_encode="off", targets=["logits", "patches"])
    now = writer_threads(off, cuda)  # 3 for host-encoded patches beside a GPU, within a quarter of the cores
    assert f"--writer-threads (now {now}) or --device-encode on" in bottleneck(writer_bound, 100.0, off, cuda, False)[1]
    teacher_bound = {"loader_wait": 6.0, "teacher": 85.0, "teacher_wait": 5.0, "writer": 5.0, "first_batch": 5.0}
    assert bottleneck(teacher_bound, 100.0, cfg, cuda, False) == ("teacher", None)
    assert bottleneck(data_bound, 15.0, cfg, cuda, False)[1] is None  # too short to say


def test_a_data_bound_build_says_so(tiny_teacher, fmnist, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A build whose DataLoader is its limit (no workers: decoding and rendering in the loop, a tiny teacher)
    reports bound_by "data" and prints the one line with the knobs."""
    import json

    from kt.teacher_cache import build
    from kt.teacher_cache.cli import main
    from tests.test_reader import build_args

    monkeypatch.setattr(build, "BOUND_MIN_S", 0.0)
    args = build_args(tiny_teacher, fmnist["train"][:1], tmp_path / "c.zarr", "--targets", "logits", views=2)
    assert main(args) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bound_by"] == "data", summary["time_s"]
    assert "waited on the DataLoader" in err and "--workers (now 0" in err


def test_shard_read_benchmark_reads_the_same_samples_both_ways():
    from tools.bench_pipeline import run

    out = run(["--quick", "--skip", "render,render_gpu,writer,build,stream"])
    read = out["shard_read"]
    assert read["samples"] == 16 and read["kt_mb_per_s"] > 0 and read["webdataset_mb_per_s"] > 0
    assert read["kt_over_webdataset"] == pytest.approx(read["webdataset_mb_per_s"] / read["kt_mb_per_s"], rel=0.01)
    assert "build_zero_teacher" not in out and "render" not in out
