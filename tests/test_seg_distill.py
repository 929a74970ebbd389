"""The transfer half of segmentation: per-pixel teacher logits into the cache, a student distilled from them.

A tiny test_vit with a DeepLabV3 head at 32 px (a 4x4 grid at output stride 8) is the teacher; students are
test_vits at 64 px (an 8x8 grid), so every test crosses grids the way a real run does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kt.checkpoints import load_checkpoint, save_checkpoint
from kt.models import create_model
from kt.render import render, render_mask, render_valid, to_tensor
from kt.shards import iter_samples
from kt.student.cli import main as student_main
from kt.student.losses import SegTaskObjective, kl_distillation, resize_seg_logits, valid_to_grid
from kt.student.loop import init_from_run
from kt.teacher_cache.build import teacher_outputs
from kt.teacher_cache.cli import main as cache_main
from kt.teacher_cache.reader import CacheReader
from kt.views import ViewSet, load_view_spec

CLASSES = ["background", "a", "b", "c"]


@pytest.fixture(scope="module")
def seg_teacher(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = create_model("test_vit", task="segmentation", num_classes=4, image_size=32, head_width=16)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("seg_teacher") / "checkpoint", classes=CLASSES))


@pytest.fixture(scope="module")
def cls_teacher(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = create_model("test_vit", num_classes=4, image_size=32)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("cls_teacher") / "checkpoint", classes=CLASSES))


@pytest.fixture(scope="module")
def transfer(fmnist, tmp_path_factory) -> str:
    """Two shards of 20 unlabeled Fashion-MNIST images (masks are not needed to distill)."""
    from kt.shards import write_shards

    samples = list(iter_samples([fmnist["train"][0]]))[:40]
    urls = write_shards(((s.key, s.image, None) for s in samples), tmp_path_factory.mktemp("transfer"),
                        prefix="transfer", maxcount=20)
    return "::".join(urls)


def build(teacher, data, out, targets="seg_logits,patches", *extra) -> int:
    return cache_main(["build", "--teacher", teacher, "--data", data, "--out", str(out), "--views", "2",
                       "--targets", targets, "--batch-size", "16", "--workers", "0", "--fit-views", "64",
                       *(("--codec", "patches=int8") if "patches" in targets else ()), *extra])


@pytest.fixture(scope="module")
def seg_cache(seg_teacher, transfer, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_cache") / "seg.zarr"
    assert build(seg_teacher, transfer, out, "seg_logits,patches", "--codec", "seg_logits=fp16") == 0
    return out


def one_line(capsys, fn, argv, pattern):
    capsys.readouterr()
    assert fn(argv) == 2
    err = "\n".join(line for line in capsys.readouterr().err.split("\n") if line.strip() and "\r" not in line)
    assert len(err.splitlines()) == 1 and pattern in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------ cache
def test_cache_records_task_classes_stride_and_grid(seg_cache):
    reader = CacheReader(str(seg_cache))
    assert reader.task == {"task": "segmentation", "num_classes": 4, "image_size": 32, "output_stride": 8,
                           "grid": [4, 4]}
    assert reader.attrs["targets"]["seg_logits"]["item_shape"] == [4, 4, 4]


def test_cached_seg_logits_equal_a_fresh_teacher_on_the_replayed_view(seg_cache, seg_teacher, transfer):
    reader = CacheReader(str(seg_cache))
    model = load_checkpoint(seg_teacher).eval()
    url = transfer.split("::")[1]
    shard = reader.shard(url, ["seg_logits"])
    images = {s.key: s.image for s in iter_samples([url])}
    rows = [0, 7, 19]
    x = torch.stack([to_tensor(render(images[shard.keys[r]], shard.params[r, v], 32), model.mean, model.std)
                     for r in rows for v in range(2)])
    with torch.inference_mode():
        fresh = teacher_outputs(model, x, ["seg_logits"])["seg_logits"]
    cached = np.stack([shard.get("seg_logits", rows=[r], view=v)[0] for r in rows for v in range(2)])
    np.testing.assert_allclose(cached, fresh, atol=2e-2, rtol=1e-2)  # fp16 codec


def test_build_refuses_the_other_task_target(seg_teacher, cls_teacher, transfer, tmp_path, capsys):
    one_line(capsys, cache_main, ["build", "--teacher", cls_teacher, "--data", transfer, "--out",
                                  str(tmp_path / "a.zarr"), "--targets", "seg_logits", "--workers", "0"],
             "target seg_logits needs a segmentation teacher")
    one_line(capsys, cache_main, ["build", "--teacher", seg_teacher, "--data", transfer, "--out",
                                  str(tmp_path / "b.zarr"), "--targets", "logits", "--workers", "0"],
             "target logits needs a classification teacher")


# ------------------------------------------------------------------------------------------ frames
def _view_with_fill(size: int) -> np.ndarray:
    """Parameters of a train view whose geometric ops bring in fill (so the validity mask matters)."""
    views = ViewSet(load_view_spec("train"), 0, 1)
    for i in range(500):
        p = views.params(f"k{i}", 0)
        valid = render_valid(p, size)
        if 0.2 < valid.mean() < 0.9:
            return p
    raise AssertionError("no train view with fill found")


def _smooth_image(n: int = 256) -> Image.Image:
    y, x = np.mgrid[0:n, 0:n] / (n - 1)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(2 * np.pi * (x + y))], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def test_teacher_frame_target_resized_equals_the_target_at_the_students_size():
    """One view at the teacher's size (32 px, grid 4) and the student's (64 px, grid 8): the teacher-frame
    per-pixel target resized to the student's grid is the target computed at the student's size, and the
    validity masks agree."""
    p = _view_with_fill(64)
    image = _smooth_image()
    # a smooth per-pixel "logit field": the rendered view's channels at each grid's resolution
    teacher_t = torch.from_numpy(np.asarray(render(image, p, 16), np.float32) / 255).permute(2, 0, 1)[None]
    student_t = torch.from_numpy(np.asarray(render(image, p, 32), np.float32) / 255).permute(2, 0, 1)[None]
    resized = resize_seg_logits(teacher_t, (32, 32))
    keep = valid_to_grid(torch.from_numpy(render_valid(p, 64))[None], (32, 32))[0]
    # cells two or more away from the fill's edge (bilinear on a 4x coarser grid blends across it)
    inner = ~torch.nn.functional.max_pool2d((~keep).float()[None, None], 5, 1, 2)[0, 0].bool()
    diff = (resized - student_t).abs()[0].mean(0)
    assert float(diff[inner].mean()) < 0.02 and float(diff[inner].max()) < 0.1
    # validity: teacher's input size, resized to the student grid == the student's own
    t_keep = valid_to_grid(torch.from_numpy(render_valid(p, 32))[None], (8, 8))[0]
    s_keep = valid_to_grid(torch.from_numpy(render_valid(p, 64))[None], (8, 8))[0]
    assert float((t_keep == s_keep).float().mean()) >= 0.95
    # masks follow the same geometry: a label image rendered at both sizes agrees (nearest, 255 fill)
    labels = Image.fromarray((np.asarray(image)[..., 0] // 64).astype(np.uint8), mode="L")
    m_t = torch.from_numpy(np.asarray(render_mask(labels, p, 32)).astype(np.int64))
    m_s = torch.from_numpy(np.asarray(render_mask(labels, p, 64)).astype(np.int64))
    up = torch.nn.functional.interpolate(m_t[None, None].float(), size=(64, 64), mode="nearest")[0, 0].long()
    assert float((up == m_s).float().mean()) >= 0.9
    assert bool(((m_s == 255) == torch.from_numpy(~render_valid(p, 64))).all())


def test_seg_task_objective_is_the_pixel_kl_on_the_resized_teacher_leaving_the_fill_out():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 8, 8)
    teacher = torch.randn(2, 4, 4, 4)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, :, :16] = False  # the two left student columns are fill
    objective = SegTaskObjective()
    loss, metrics = objective({"seg_logits": student}, {"seg_logits": teacher, "valid": valid})
    resized = torch.nn.functional.interpolate(teacher, size=(8, 8), mode="bilinear", align_corners=False)
    ignore = torch.zeros(2, 8, 8, dtype=torch.bool)
    ignore[:, :, :2] = True
    assert torch.allclose(loss, kl_distillation(student, resized, ignore_mask=ignore))
    kept = student[..., 2:], resized[..., 2:]
    assert torch.allclose(loss, kl_distillation(*kept))
    # -inf (the pixel-topk decode of a zero tail) stays finite through the resize
    teacher[:, 1] = float("-inf")
    assert torch.isfinite(objective({"seg_logits": student}, {"seg_logits": teacher})[0])


# ---------------------------------------------------------------------------------------- students
def train_args(cache, data, out, *extra, objective="task"):
    return ["train", "--task", "segmentation", "--model", "test_vit", "--output-stride", "8", "--cache", str(cache),
            "--data", data, "--objective", objective, "--image-size", "64", "--batch-size", "8", "--workers", "0",
            "--epochs", "1", "--lr", "1e-3", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def seg_run(seg_cache, transfer, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_run") / "distill"
    assert student_main(train_args(seg_cache, transfer, out, "--head-width", "48")) == 0
    return out


def test_distilled_seg_student_and_its_finetune_init(seg_run):
    student = load_checkpoint(str(seg_run / "checkpoint")).eval()
    assert (student.task, student.num_classes, student.output_stride, student.classes) == \
        ("segmentation", 4, 8, CLASSES)
    assert student(torch.zeros(2, 3, 64, 64)).shape == (2, 4, 8, 8)
    assert student.card["head_width"] == 48  # --head-width: the student's DeepLabV3 width
    metrics = [json.loads(line) for line in (seg_run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) and 0 <= m["agree"] <= 1 for m in metrics)
    # finetune --init: the distilled seg model, head kept (task objective, classes match)
    model, kept = init_from_run(str(seg_run), 4, 64, head="auto", classes=CLASSES, task="segmentation")
    assert kept and model.task == "segmentation"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), student(x), atol=1e-6)
    # another class count: a new head on the same backbone
    model, kept = init_from_run(str(seg_run), 6, 64, head="auto", task="segmentation")
    assert not kept and model.eval()(x).shape == (2, 6, 8, 8)
    # a segmentation run is no classification init
    with pytest.raises(Exception, match="is a segmentation model"):
        init_from_run(str(seg_run), 4, 64, head="auto")


@pytest.mark.slow
def test_patch_cosine_seg_student_on_the_cached_patches(seg_cache, transfer, tmp_path):
    out = tmp_path / "pc"
    assert student_main(train_args(seg_cache, transfer, out, objective="patch-cosine")) == 0
    student = load_checkpoint(str(out / "checkpoint"))
    assert student.task == "segmentation" and student.output_stride == 8
    model, kept = init_from_run(str(out), 4, 64, head="auto", task="segmentation")
    assert not kept  # patch-cosine trains no head


def test_seg_train_refusals(seg_cache, seg_teacher, cls_teacher, transfer, tmp_path, capsys):
    cls_cache = tmp_path / "cls.zarr"
    assert build(cls_teacher, transfer, cls_cache, "logits,patches") == 0
    # the default top-k codecs keep k classes; a teacher with no more than k gets fp16 instead of a refusal
    assert CacheReader(str(cls_cache)).attrs["targets"]["logits"]["codec"] == "fp16"
    patches_only = tmp_path / "patches.zarr"
    assert build(seg_teacher, transfer, patches_only, "patches") == 0
    small_default = tmp_path / "default.zarr"
    assert build(seg_teacher, transfer, small_default, "seg_logits") == 0
    assert CacheReader(str(small_default)).attrs["targets"]["seg_logits"]["codec"] == "fp16"  # 4 classes < k=5
    three = tmp_path / "classes.json"
    three.write_text(json.dumps(["x", "y", "z"]))
    out = str(tmp_path / "x")

    def online(argv, teacher):  # --teacher instead of --cache
        i = argv.index("--cache")
        return argv[:i] + ["--teacher", teacher] + argv[i + 2:]

    cases = [
        (train_args(patches_only, transfer, out), "needs cached seg_logits"),
        (train_args(seg_cache, transfer, out, "--expect-classes", str(three)), "num_classes"),
        (train_args(cls_cache, transfer, out), "is from a classification teacher"),
        (train_args(seg_cache, transfer, out)[:1] + train_args(seg_cache, transfer, out)[3:],  # no --task
         "is from a segmentation teacher"),
        (train_args(seg_cache, transfer, out, "--batch-size", "1"), "--batch-size >= 2"),
        (train_args(seg_cache, transfer, out, "--batch-size", "13"), "a batch of one"),  # 40 = 3 * 13 + 1
        (train_args(seg_cache, transfer, out, "--output-stride", "4"), "output-stride"),
        (train_args(seg_cache, transfer, out, objective="embedding-contrastive"), "for task segmentation"),
        (online(train_args(seg_cache, transfer, out), cls_teacher), "is from a classification teacher"),
    ]
    for argv, pattern in cases:
        one_line(capsys, student_main, argv, pattern)


# ---------------------------------------------------------------------------------------------- tools
@pytest.mark.slow
def test_seg_codecs_benchmark_orders_codecs_by_bytes_and_fidelity(tmp_path):
    from tools import bench_seg_codecs
    from tools.bench import _parse

    args = _parse(bench_seg_codecs, ["--steps", "2", "--images", "8", "--image-size", "32", "--samples", "8",
                                     "--codecs", "fp16,pixel-topk:k=1,pixel-topk:k=5", "--work", str(tmp_path)])
    rows = {r["codec"]: r for r in bench_seg_codecs.run(args)["codecs"]}
    assert rows["fp16"]["plan_bytes_per_cell"] == 22 and rows["pixel-topk:k=5"]["plan_bytes_per_cell"] == 17
    assert rows["fp16"]["kl_mean"] < 1e-4 and rows["fp16"]["top1_agreement"] == 1
    assert rows["pixel-topk:k=1"]["kl_mean"] >= rows["pixel-topk:k=5"]["kl_mean"]
    assert all(r["disk_bytes_per_view"] > 0 for r in rows.values())


@pytest.mark.slow
def test_seg_models_speed_runs_build_distill_and_eval():
    from tools import bench_seg_models
    from tools.bench import _parse

    args = _parse(bench_seg_models, ["--models", "test_vit", "--image-size", "64", "--num-classes", "5",
                                     "--build-teachers", "test_vit", "--student", "test_vit", "--speed-size", "32",
                                     "--speed-images", "8", "--batch-size", "4", "--head-width", "16"])
    speed = bench_seg_models.run(args)["speed"]
    assert speed["build_images_per_s"]["test_vit"] > 0 and speed["distill"]["steps"] == 2
    assert speed["eval_images_per_s"] > 0


def test_seg_finetune_cli_init_from_a_seg_distill_run_keeps_its_head(seg_run, tmp_path, capsys):
    """`kt-student finetune --task segmentation --init RUN` on the distilled run: its DeepLabV3 head is kept."""
    from kt.shards import write_shards

    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        mask = Image.fromarray(rng.integers(0, 4, (64, 64), dtype=np.uint8), mode="L")
        records.append((f"m{i}", image, mask))

    def encoded(im):
        import io

        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    urls = write_shards(({"__key__": k, "png": encoded(im), "mask.png": encoded(m)} for k, im, m in records),
                        tmp_path / "labeled", prefix="labeled", maxcount=8, classes=CLASSES)
    capsys.readouterr()
    assert student_main(["finetune", "--task", "segmentation", "--init", str(seg_run), "--data", urls[0],
                         "--labeled-images", "8", "--image-size", "64", "--batch-size", "4", "--epochs", "1",
                         "--workers", "0", "--out", str(tmp_path / "ft")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # --train auto: the teacher (a checkpoint saved without its finetune's record) counts as having seen the
    # labels, so only the DeepLabV3 head trains: every backbone weight and BatchNorm statistic stays as distilled
    assert summary["init_head"] == "kept" and summary["train"] == "head"
    tuned = load_checkpoint(str(tmp_path / "ft" / "checkpoint"))
    assert tuned.task == "segmentation"
    distilled = load_checkpoint(str(seg_run / "checkpoint")).state_dict()
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, distilled[k])}
    assert changed and all(k.startswith("head.") for k in changed), sorted(changed)[:5]


def test_train_auto_trains_the_head_on_the_teachers_labels_or_fewer_and_every_weight_on_more():
    from kt.student.finetune import resolve_train

    assert resolve_train("auto", True, 50, 4000) == resolve_train("auto", True, 50, None) == "head"
    assert resolve_train("auto", True, 50, 50) == "head" and resolve_train("auto", True, 51, 50) == "all"
    assert resolve_train("auto", False, 50, 4000) == "all"  # a new head (or no --init) trains every weight
    assert resolve_train("all", True, 50, 4000) == "all" and resolve_train("head", False, 50, 10) == "head"
