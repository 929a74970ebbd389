"""kt-student train: objectives from the cache, replay alignment, resume, reuse, online mode, refusals."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kt.checkpoints import load_checkpoint
from kt.shards import iter_samples
from kt.views import render, to_tensor
from kt.student.cli import main
from kt.teacher_cache.build import BuildConfig, build_cache
from kt.teacher_cache.reader import CacheReader


@pytest.fixture(scope="module")
def teacher(fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["finetune", "--model", "test_efficientnet", "--data", str(fmnist["root"] / "train"),
                 "--labels-per-class", "3", "--epochs", "1", "--image-size", "32", "--batch-size", "10",
                 "--workers", "0", "--out", str(out)]) == 0
    return out / "checkpoint"


@pytest.fixture(scope="module")
def cache(fmnist, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    build_cache(BuildConfig(teacher=str(teacher), data=str(fmnist["root"] / "train"), out=str(out), views=2,
                            targets=["logits", "embedding", "patches"], image_size=32, batch_size=50, workers=0,
                            codec=["logits=fp16", "embedding=fp16", "patches=fp16"]))
    return out


def train(fmnist, cache, out, *extra, student="test_vit"):
    return main(["train", "--model", student, "--cache", str(cache), "--data", str(fmnist["root"] / "train"),
                 "--image-size", "32", "--batch-size", "32", "--epochs", "2", "--workers", "0",
                 "--log-every", "1", "--out", str(out), *extra])


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["task", "embedding-contrastive", "patch-cosine"])
def test_each_objective_trains_from_cache(fmnist, cache, tmp_path, objective, capsys):
    assert train(fmnist, cache, tmp_path / "r", "--objective", objective, "--lr", "0.003") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["completed"] and summary["steps"] == 2 * 10  # 300 samples / 32 -> 10 batches per epoch
    model = load_checkpoint(tmp_path / "r" / "checkpoint")
    assert model.num_classes == (10 if objective == "task" else 0)
    heads = load_file(str(tmp_path / "r" / "objective.safetensors"))
    assert heads or objective == "task"
    assert all(np.isfinite(losses(tmp_path / "r")))


def test_student_view_replays_what_the_teacher_saw(fmnist, cache, teacher):
    """Stream batches carry the stored params; rendered at the teacher's size they give the cached targets."""
    from kt.student.dataset import CacheSource
    from kt.student.stream import ReplayStream, StreamSpec

    reader = CacheReader(str(cache))
    urls = fmnist["train"]
    spec = StreamSpec(tuple(urls), (100, 100, 100), 16, seed=0, workers=0)
    model = load_checkpoint(teacher)
    stream = ReplayStream(spec, 1, 0, CacheSource(reader, ["logits", "patches"]), reader.view_set,
                          "cycle", 24, model.mean, model.std)
    batch = next(iter(stream))
    images = {s.key: s.image for s in iter_samples(urls)}
    for i, key in enumerate(batch["keys"][:6]):
        shard = reader.shard(next(u for u in urls if key in reader.shard(u, []).rows), ["logits"])
        row, v = shard.rows[key], int(batch["views"][i])
        assert v == 1  # epoch 1 with the cycle policy
        assert np.array_equal(batch["params"][i].numpy(), shard.params[row, v])
        # the student's pixels: the stored view at its own size
        student_x = to_tensor(render(images[key], shard.params[row, v], 24), model.mean, model.std)
        assert torch.equal(batch["x"][i], student_x)
        # the teacher's pixels: the same view at the teacher's size reproduce the cached targets
        with torch.no_grad():
            fresh = model.forward_features(to_tensor(render(images[key], shard.params[row, v], 32),
                                                     model.mean, model.std)[None])
        np.testing.assert_allclose(batch["targets"]["logits"][i].numpy(), fresh["logits"][0].numpy(),
                                   rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(batch["targets"]["patches"][i].numpy(),
                                   fresh["grid"][0].permute(1, 2, 0).numpy(), rtol=2e-3, atol=2e-3)


def test_resume_mid_epoch_equals_uninterrupted(fmnist, cache, tmp_path):
    assert train(fmnist, cache, tmp_path / "a", "--objective", "patch-cosine") == 0
    assert train(fmnist, cache, tmp_path / "b", "--objective", "patch-cosine", "--stop-after-steps", "13") == 0
    assert json.loads((tmp_path / "b" / "state" / "progress.json").read_text())["batches_in_epoch"] == 3
    # the worker count decides the batch order: resuming with another one is refused, not silently inexact
    assert train(fmnist, cache, tmp_path / "b", "--objective", "patch-cosine", "--workers", "2") == 2
    assert train(fmnist, cache, tmp_path / "b", "--objective", "patch-cosine") == 0
    for name in ("checkpoint/model.safetensors", "objective.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_grad_accum_windows_end_at_epoch_ends_and_resume_exactly(fmnist, cache, tmp_path, monkeypatch, capsys):
    """10 batches per epoch in windows of 3 -> 3, 3, 3, 1: 4 optimizer steps per epoch, and a kill right
    after the epoch-end save loses nothing (the stream is not accelerate-prepared, so fit cuts the windows)."""
    from tests import kill_after_epoch

    args = ("--objective", "task", "--grad-accum", "3", "--save-every", "4")
    assert train(fmnist, cache, tmp_path / "a", *args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 * 4
    log = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [0] * 4 + [1] * 4
    # the default lr scales with the global batch (32 x 3 accumulated): sqrt(96 / 64) x 1e-2
    assert summary["lr"] == pytest.approx(1e-2 * (96 / 64) ** 0.5)
    assert log[-1]["lr"] == pytest.approx(summary["lr"] * 0.01)  # the cosine ends at its minimum
    with monkeypatch.context() as m:
        kill_after_epoch.install(m)
        with pytest.raises(kill_after_epoch.Killed):
            train(fmnist, cache, tmp_path / "b", *args)
    assert train(fmnist, cache, tmp_path / "b", *args) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a = load_checkpoint(tmp_path / "a" / "checkpoint").state_dict()
    b = load_checkpoint(tmp_path / "b" / "checkpoint").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_one_cache_trains_two_architectures(fmnist, cache, tmp_path):
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    for student in ("test_vit", "test_convnext"):
        assert train(fmnist, cache, tmp_path / student, "--objective", "task", "--epochs", "1",
                     student=student) == 0
        assert load_checkpoint(tmp_path / student / "checkpoint").arch == student
    assert before == {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}


def test_online_teacher_matches_cached(fmnist, cache, teacher, tmp_path):
    """Same views, same student init: the online baseline's losses equal the cached run's (fp16 targets)."""
    assert train(fmnist, cache, tmp_path / "cached", "--objective", "task", "--epochs", "1") == 0
    assert main(["train", "--model", "test_vit", "--teacher", str(teacher), "--views", "2",
                 "--data", str(fmnist["root"] / "train"), "--image-size", "32", "--batch-size", "32",
                 "--epochs", "1", "--workers", "0", "--log-every", "1", "--objective", "task",
                 "--out", str(tmp_path / "online")]) == 0
    np.testing.assert_allclose(losses(tmp_path / "online"), losses(tmp_path / "cached"), rtol=5e-3, atol=1e-4)


def test_finetune_init_from_distilled(fmnist, cache, tmp_path, capsys):
    assert train(fmnist, cache, tmp_path / "d", "--objective", "patch-cosine", "--epochs", "1") == 0
    # lr 0: the finetuned backbone is exactly what --init started from (a ViT: no BatchNorm statistics move)
    assert main(["finetune", "--init", str(tmp_path / "d"), "--data", str(fmnist["root"] / "train"),
                 "--labels-per-class", "2", "--epochs", "1", "--image-size", "32", "--batch-size", "10",
                 "--workers", "0", "--lr", "0", "--out", str(tmp_path / "f")]) == 0
    distilled = load_checkpoint(tmp_path / "d" / "checkpoint")
    model = load_checkpoint(tmp_path / "f" / "checkpoint")
    assert model.arch == "test_vit" and model.num_classes == 10 and distilled.num_classes == 0
    torch.testing.assert_close(model.backbone.state_dict(), distilled.backbone.state_dict(), rtol=0, atol=0)


def test_finetune_init_keeps_the_distilled_task_head(fmnist, cache, tmp_path, capsys):
    from kt.errors import UserError
    from kt.student.loop import init_from_run

    assert train(fmnist, cache, tmp_path / "task", "--objective", "task", "--epochs", "1") == 0
    distilled = load_checkpoint(tmp_path / "task" / "checkpoint")
    assert distilled.classes and distilled.num_classes == 10
    model, kept = init_from_run(str(tmp_path / "task"), 10, 32, "auto", distilled.classes)
    assert kept and torch.equal(model.head.weight, distilled.head.weight)
    model, kept = init_from_run(str(tmp_path / "task"), 10, 32, "new", distilled.classes)
    assert not kept and not torch.equal(model.head.weight, distilled.head.weight)
    # the same count of classes in another order is another head: not kept by auto, refused by keep
    other = list(reversed(distilled.classes))
    assert init_from_run(str(tmp_path / "task"), 10, 32, "auto", other)[1] is False
    with pytest.raises(UserError, match="classes differ"):
        init_from_run(str(tmp_path / "task"), 10, 32, "keep", other)
    # a run distilled without a task head gets a new one
    assert train(fmnist, cache, tmp_path / "patch", "--objective", "patch-cosine", "--epochs", "1") == 0
    assert init_from_run(str(tmp_path / "patch"), 10, 32, "auto")[1] is False
    with pytest.raises(UserError, match="head has 0 outputs"):
        init_from_run(str(tmp_path / "patch"), 10, 32, "keep")
    # the command keeps it by default, says so, and (--train auto) trains only that head: the distilled
    # backbone comes out exactly as it went in
    capsys.readouterr()
    finetune = ["finetune", "--data", str(fmnist["root"] / "train"), "--labels-per-class", "2", "--epochs", "1",
                "--image-size", "32", "--batch-size", "10", "--workers", "0", "--lr", "0.01"]
    assert main([*finetune, "--init", str(tmp_path / "task"), "--out", str(tmp_path / "f")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["init_head"] == "kept" and summary["train"] == "head" and summary["teacher_labeled_images"] == 30
    tuned = load_checkpoint(tmp_path / "f" / "checkpoint")
    torch.testing.assert_close(tuned.backbone.state_dict(), distilled.backbone.state_dict(), rtol=0, atol=0)
    assert not torch.equal(tuned.head.weight, distilled.head.weight)
    # more labels than the teacher was finetuned on (its 30, read through the run's cache): every weight trains
    assert main([*finetune, "--init", str(tmp_path / "task"), "--labels-per-class", "5", "--out", str(tmp_path / "m")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train"] == "all" and summary["teacher_labeled_images"] == 30
    # a new head (or --train all) trains every weight
    for run, extra in (("patch", []), ("task", ["--train", "all"]), ("task", ["--init-head", "new"])):
        out = tmp_path / f"f-{run}-{len(extra) and extra[0]}"
        assert main([*finetune, "--init", str(tmp_path / run), *extra, "--out", str(out)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train"] == "all"
        start = load_checkpoint(tmp_path / run / "checkpoint").backbone.state_dict()
        moved = load_checkpoint(out / "checkpoint").backbone.state_dict()
        assert any(not torch.equal(start[k], moved[k]) for k in start)


def refuse(capsys, argv, pattern):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pattern in err, err


def test_refusals(fmnist, cache, teacher, tmp_path, capsys):
    base = ["train", "--model", "test_vit", "--cache", str(cache), "--image-size", "32", "--workers", "0"]
    data = ["--data", str(fmnist["root"] / "train")]
    refuse(capsys, base + data + ["--objective", "distill", "--out", str(tmp_path / "x")], "unknown objective")
    refuse(capsys, base + data + ["--view-spec", "train", "--out", str(tmp_path / "x")], "view")  # built light
    other_classes = tmp_path / "classes.json"
    other_classes.write_text(json.dumps([f"c{i}" for i in range(10)]))
    refuse(capsys, base + data + ["--expect-classes", str(other_classes), "--out", str(tmp_path / "x")], "classes")
    # another teacher: same card, other weights
    other = tmp_path / "other"
    model = load_checkpoint(teacher)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    from kt.checkpoints import save_checkpoint

    save_checkpoint(model, other, classes=model.classes)
    refuse(capsys, base + data + ["--expect-teacher", str(other), "--out", str(tmp_path / "x")], "weights_sha256")
    # data the cache was not built from (Fashion-MNIST test keys)
    refuse(capsys, base + ["--data", fmnist["test"][0], "--out", str(tmp_path / "x")], "")
    # an objective whose target the cache lacks
    small = tmp_path / "logits.zarr"
    build_cache(BuildConfig(teacher=str(teacher), data=fmnist["train"][0], out=str(small), views=1,
                            targets=["logits"], image_size=32, workers=0))
    refuse(capsys, ["train", "--model", "test_vit", "--cache", str(small), "--data", fmnist["train"][0],
                    "--objective", "patch-cosine", "--out", str(tmp_path / "x")], "the cache holds logits")
    # shards the cache has not completed
    refuse(capsys, ["train", "--model", "test_vit", "--cache", str(small), "--data", str(fmnist["root"] / "train"),
                    "--objective", "task", "--out", str(tmp_path / "x")], "incomplete")
    refuse(capsys, ["train", "--model", "test_vit", "--data", fmnist["train"][0], "--out", str(tmp_path / "x")],
           "exactly one of --cache")


@pytest.mark.slow
def test_two_process_training(fmnist, cache, tmp_path):
    """Two DDP processes (gloo on CPU): disjoint shards per rank, a common step count, one checkpoint.

    `accelerate launch --cpu --num_processes 2` starts a single process (accelerate 1.15 needs MPI for
    that); `--multi_gpu` goes through torchrun and kt asks accelerate for CPU when there is no CUDA.
    """
    from kt.student.stream import StreamSpec, steps_per_epoch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "-m", "kt.student.cli", "train", "--model", "test_vit", "--cache", str(cache),
           "--data", str(fmnist["root"] / "train"), "--image-size", "32", "--batch-size", "16", "--epochs", "1",
           "--workers", "0", "--objective", "task", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, check=True, timeout=600, capture_output=True, text=True)
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert summaries and all(s["processes"] == 2 for s in summaries)
    expected = steps_per_epoch(StreamSpec(tuple(fmnist["train"]), (100, 100, 100), 16, 0, 0, 2, 0))
    assert summaries[0]["steps_per_epoch"] == expected < 300 // 16  # each rank takes its own shards
    assert (tmp_path / "ddp" / "checkpoint" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_process_grad_accum_resume_equals_uninterrupted(fmnist, cache, tmp_path):
    """Two processes, 7 batches per epoch each in windows of 3 (3, 3, 1): killed right after the first
    epoch-end save and resumed == uninterrupted, and the schedule ends at its minimum."""
    from kt.student.stream import StreamSpec, steps_per_epoch

    assert steps_per_epoch(StreamSpec(tuple(fmnist["train"]), (100, 100, 100), 16, 0, 0, 2, 0)) == 7
    args = ["train", "--model", "test_vit", "--cache", str(cache), "--data", str(fmnist["root"] / "train"),
            "--image-size", "32", "--batch-size", "16", "--epochs", "2", "--workers", "0", "--objective", "task",
            "--grad-accum", "3", "--log-every", "1", "--save-every", "3"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    subprocess.run(launch + ["-m", "kt.student.cli", *args, "--out", str(tmp_path / "a")], check=True, timeout=600,
                   capture_output=True)
    killed = subprocess.run(launch + ["tests/kill_after_epoch.py", *args, "--out", str(tmp_path / "b")],
                            timeout=600, capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    assert killed.returncode != 0 and not (tmp_path / "b" / "checkpoint").exists()
    subprocess.run(launch + ["-m", "kt.student.cli", *args, "--out", str(tmp_path / "b")], check=True, timeout=600,
                   capture_output=True)
    log = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 * 3 and log[-1]["lr"] == pytest.approx(1e-2 * (96 / 64) ** 0.5 * 0.01)  # 16 x 2 ranks x 3 accumulated
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a = load_checkpoint(tmp_path / "a" / "checkpoint").state_dict()
    b = load_checkpoint(tmp_path / "b" / "checkpoint").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_render_in_the_main_process_gives_the_workers_views_and_losses(fmnist, cache, teacher, tmp_path,
                                                                       monkeypatch):
    """`--render cuda` makes the workers only decode and renders each batch where the student is
    (`render_sources`, the batched `kt.render_tensor` path). On the CPU the same path runs on CPU tensors:
    its views are the PIL views within the render tolerance, and the online run's losses follow."""
    import kt.student.distill as distill
    from kt.student.distill import FreshSource, shard_keys
    from kt.student.stream import ReplayStream, StreamSpec, render_sources
    from kt.views import VIEW_PRESETS, ViewSet

    urls = fmnist["train"][:1]
    keys = shard_keys(urls)
    spec = StreamSpec(tuple(urls), (len(keys[urls[0]]),), 16, seed=0, workers=0)
    common = dict(view_set=ViewSet(VIEW_PRESETS["train"], 0, 2), policy="cycle", image_size=32,
                  mean=(0.5,) * 3, std=(0.25,) * 3, teacher_size=40, teacher_norm=((0.4,) * 3, (0.2,) * 3))
    workers = list(ReplayStream(spec, 0, 0, FreshSource(keys), **common))[:3]
    main_thread = list(ReplayStream(spec, 0, 0, FreshSource(keys), **common, device_render=True))[:3]
    for a, b in zip(workers, main_thread):
        assert "x" not in b and len(b["sources"]) == 16 and b["sources"][0].dtype == torch.uint8
        assert a["keys"] == b["keys"] and torch.equal(a["params"], b["params"])
        b = render_sources(b, "cpu", 32, (0.5,) * 3, (0.25,) * 3, 40, ((0.4,) * 3, (0.2,) * 3))
        for name, std in (("x", 0.25), ("teacher_x", 0.2)):
            assert b[name].shape == a[name].shape and b[name].dtype == torch.float32
            mad = float((b[name] - a[name]).abs().mean()) * std * 255  # in 8-bit levels
            assert mad <= 1.0, (name, mad)
    assert render_sources(workers[0], "cpu", 32, (0.5,) * 3, (0.25,) * 3) is workers[0]  # rendered already

    # --render cuda on the CPU: the main process renders CPU tensors
    monkeypatch.setattr(distill, "render_device_for",
                        lambda choice, device=None: torch.device("cpu") if choice == "cuda" else None)
    rendered = []

    def counting(batch, *a, **kw):
        rendered.append("sources" in batch)
        return render_sources(batch, *a, **kw)

    monkeypatch.setattr(distill, "render_sources", counting)
    args = ["train", "--model", "test_vit", "--teacher", str(teacher), "--views", "2", "--data", urls[0],
            "--image-size", "32", "--batch-size", "32", "--epochs", "1", "--workers", "1", "--log-every", "1",
            "--objective", "task"]
    assert main(args + ["--out", str(tmp_path / "pil")]) == 0
    assert rendered == []
    assert main(args + ["--out", str(tmp_path / "tensor"), "--render", "cuda"]) == 0
    pil, tensor = losses(tmp_path / "pil"), losses(tmp_path / "tensor")
    assert rendered == [True] * len(tensor) and len(tensor) == len(pil) > 1  # every batch from its sources
    print("losses, PIL views:", pil, "tensor views:", tensor)
    np.testing.assert_allclose(tensor, pil, rtol=0.02)


def test_render_cuda_without_cuda_is_one_line(fmnist, cache, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "x"
    assert train(fmnist, cache, out, "--render", "cuda") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--render cuda: this process has no CUDA device" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("online", [False, True], ids=["cached", "online-teacher"])
def test_uint8_views_train_the_same_student(fmnist, cache, teacher, tmp_path, monkeypatch, online):
    """Workers may send uint8 views, normalised where the model runs (the default toward a CUDA student):
    the run is the same bit for bit as with float views made in the workers, the online teacher's views too."""
    import kt.render
    from kt.student import stream

    def run(out):
        if not online:
            return train(fmnist, cache, out, "--objective", "patch-cosine")
        return main(["train", "--model", "test_vit", "--teacher", str(teacher), "--views", "2",
                     "--data", str(fmnist["root"] / "train"), "--image-size", "32", "--batch-size", "32",
                     "--epochs", "1", "--workers", "0", "--log-every", "1", "--objective", "task", "--out", str(out)])

    sent = []
    real = stream.ReplayStream._collate
    monkeypatch.setattr(stream.ReplayStream, "_collate", lambda self, buf: (lambda b: sent.append(
        {k: b[k].dtype for k in ("x", "teacher_x") if k in b}) or b)(real(self, buf)))
    runs = {}
    for mode in ("never", "always"):
        monkeypatch.setattr(kt.render, "UINT8_VIEWS", mode)
        sent.clear()
        assert run(tmp_path / mode) == 0
        want = torch.uint8 if mode == "always" else torch.float32
        assert sent and all(dt == want for s in sent for dt in s.values()) and all(("teacher_x" in s) == online
                                                                                 for s in sent)
        runs[mode] = load_file(str(tmp_path / mode / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(runs["never"][k], runs["always"][k]) for k in runs["never"])
    assert losses(tmp_path / "never") == losses(tmp_path / "always")


def test_a_batch_of_one_is_refused_only_where_the_student_cannot_train_on_it(fmnist, cache, tmp_path, capsys):
    """300 samples in batches of 299 leave a last batch of one: EfficientNet at 32 px (a 1x1 map into
    BatchNorm) cannot train on it and crashed mid-run; it is refused in one line before the run folder exists.
    A ViT (LayerNorm) trains on it."""
    capsys.readouterr()
    out = tmp_path / "cnn"
    assert train(fmnist, cache, out, "--batch-size", "299", "--epochs", "1", student="test_efficientnet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epoch 0 would end with a batch of one sample" in err, err
    assert not out.exists()
    assert train(fmnist, cache, tmp_path / "vit", "--batch-size", "299", "--epochs", "1") == 0
    assert len(losses(tmp_path / "vit")) == 2


def test_a_vit_size_that_is_not_a_patch_multiple_is_refused_before_the_run(fmnist, cache, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "vit40"
    assert train(fmnist, cache, out, "--image-size", "40") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a multiple of 16 (use 32 or 48)" in err, err
    assert not out.exists()


def test_a_run_reports_what_the_student_learned(fmnist, cache, tmp_path, capsys):
    """Agreement per epoch, accuracy as distilled against samples and CPU time: the curve every --eval-every steps
    and at the end, the last record the student's own accuracy on the validation data."""
    from kt.student.evaluate import evaluate

    assert train(fmnist, cache, tmp_path / "r", "--objective", "task", "--val-data", str(fmnist["root"] / "test"),
                 "--eval-every", "4", "--lr", "0.003") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(x) for x in (tmp_path / "r" / "learning.jsonl").read_text().splitlines()]
    # every 4 steps and at each epoch end (step 10, and 20: the end)
    assert [r["step"] for r in records] == [4, 8, 10, 12, 16, 20]
    assert [r["samples"] for r in records][:2] == [4 * 32, 8 * 32]
    assert all(b["cpu_s"] >= a["cpu_s"] and b["wall_s"] >= a["wall_s"] for a, b in zip(records, records[1:]))
    learned = json.loads((tmp_path / "r" / "learning.json").read_text())
    assert len(learned["agree_per_epoch"]) == 2 and all(0 <= a <= 1 for a in learned["agree_per_epoch"])
    assert learned["val_top1"] == summary["learned"]["val_top1"]
    model = load_checkpoint(tmp_path / "r" / "checkpoint")
    assert learned["val_top1"] == round(evaluate(model, fmnist["test"], workers=0)["top1"], 4)
    # without a task head there is nothing to evaluate: refused before the run, in one line
    assert train(fmnist, cache, tmp_path / "p", "--objective", "patch-cosine",
                 "--val-data", str(fmnist["root"] / "test")) == 2
    assert "--val-data" in capsys.readouterr().err


def test_finetune_from_a_distilled_student_reports_it_beside_the_finetuned_one(fmnist, cache, tmp_path, capsys):
    """The as-distilled student's accuracy on --val-data sits beside the finetuned one (summary and eval.json), is
    the kept head's own (evaluated before any step), and a finetune that ends below it says so on stderr."""
    from kt.student.evaluate import evaluate

    assert train(fmnist, cache, tmp_path / "d", "--objective", "task", "--epochs", "1", "--lr", "0.003") == 0
    before = evaluate(load_checkpoint(tmp_path / "d" / "checkpoint"), fmnist["test"], workers=0)["top1"]
    capsys.readouterr()
    # lr 0.5 on every weight wrecks the student: the finetuned one ends below the distilled one
    assert main(["finetune", "--init", str(tmp_path / "d"), "--data", str(fmnist["root"] / "train"),
                 "--val-data", str(fmnist["root"] / "test"), "--labels-per-class", "2", "--epochs", "2",
                 "--lr", "0.5", "--train", "all", "--image-size", "32", "--batch-size", "10", "--workers", "0",
                 "--out", str(tmp_path / "f")]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    metrics = json.loads((tmp_path / "f" / "eval.json").read_text())
    assert summary["init_top1"] == metrics["init_top1"] == before
    assert summary["top1"] == metrics["top1"]
    assert ("below the distilled student" in captured.err) == (summary["top1"] < before)
    # killed after a step and rerun: the as-distilled figure is the one measured before that step (eval_init.json)
    again = ["finetune", "--init", str(tmp_path / "d"), "--data", str(fmnist["root"] / "train"),
             "--val-data", str(fmnist["root"] / "test"), "--labels-per-class", "2", "--epochs", "2",
             "--lr", "0.5", "--train", "all", "--image-size", "32", "--batch-size", "10", "--workers", "0",
             "--save-every", "1", "--out", str(tmp_path / "r")]
    assert main([*again, "--stop-after-steps", "1"]) == 0
    assert json.loads((tmp_path / "r" / "eval_init.json").read_text()) == {"top1": before}
    capsys.readouterr()
    assert main(again) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["init_top1"] == json.loads((tmp_path / "r" / "eval.json").read_text())["init_top1"] == before
    # the head alone at lr 0 trains nothing (BatchNorm statistics stay as loaded): the distilled student, exactly
    assert main(["finetune", "--init", str(tmp_path / "d"), "--data", str(fmnist["root"] / "train"),
                 "--val-data", str(fmnist["root"] / "test"), "--labels-per-class", "2", "--epochs", "1",
                 "--lr", "0", "--train", "head", "--image-size", "32", "--batch-size", "10", "--workers", "0",
                 "--out", str(tmp_path / "g")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["top1"] == summary["init_top1"] == before
