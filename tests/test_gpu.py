"""The whole pipeline on a GPU: finetune -> kt-cache build -> kt-student train -> finetune --init -> eval, and
the retrieval embed, each checked against an fp32 CPU reference.

    python -m pytest -q -m gpu tests/test_gpu.py          # skipped without CUDA (make gpu-check runs it)
    KT_TEST_DEVICE=cpu python -m pytest -q -m gpu tests/test_gpu.py    # the same checks on the CPU (a dry run)

Tiny timm models (`test_vit` teacher, `test_efficientnet` student) at 32 px, random init, on synthetic
labeled shards written to a temporary folder (no dataset needs to be installed on the GPU machine). What is
asserted: every stage ran on the device; the cached targets (teacher in bf16 autocast on CUDA) are within
a stated fidelity of an fp32 CPU forward on the same replayed views; distillation from the cache starts
from the same loss as a CPU run of the same command and lowers it; the online teacher gives the cached
run's losses; evaluation gives the metrics on the device (it crashed there before); the embed matches an
fp32 CPU forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DEVICE = os.environ.get("KT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]

# Fidelity of bf16 autocast + fp16 storage against fp32, on this tiny teacher (the realistic-size figures:
# `python -m tools.bench gpu`, docs/benchmarks.md). bf16 keeps 8 bits of mantissa (~0.4% per rounding).
MAX_MEAN_KL = 2e-3  # nats, softmax of cached vs fp32 logits (CPU bf16 autocast, random test_vit: 4e-5)
MIN_TOP1_AGREEMENT = 0.95  # a finetuned teacher is confident; CPU bf16 autocast on a random head gives 0.98
MIN_MEAN_COSINE = 0.995  # embedding and patch features
MIN_COSINE = 0.98
CLASSES = ["red", "green", "blue", "grey"]
SIZE = 32
ROOT = Path(__file__).resolve().parent.parent


def synthetic_images(n: int, seed: int):
    """Labeled 32 px images a tiny model can learn: a class colour and a class stripe frequency, plus noise."""
    rng = np.random.default_rng(seed)
    palette = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [128, 128, 128]], np.float32)
    rows = np.arange(SIZE)[:, None, None]
    for i in range(n):
        c = i % len(CLASSES)
        stripes = 40 * np.sin(rows * (c + 1) * np.pi / 8)
        a = palette[c] + stripes + rng.normal(0, 25, (SIZE, SIZE, 3))
        yield f"s{seed}-{i:05d}", Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from kt.shards import write_shards

    root = tmp_path_factory.mktemp("gpu-data")
    train = write_shards(synthetic_images(256, 0), root / "train", prefix="train", maxcount=64, classes=CLASSES)
    test = write_shards(synthetic_images(96, 1), root / "test", prefix="test", maxcount=48, classes=CLASSES)
    return {"train": root / "train", "test": root / "test", "train_urls": train, "test_urls": test}


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax p || softmax q) per row, in nats."""
    p = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def student_main(*argv) -> int:
    from kt.student.cli import main

    return main([str(a) for a in argv])


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A finetuned tiny ViT with --val-data: the evaluation after training runs on the device."""
    import kt.student.finetune as finetune

    out = tmp_path_factory.mktemp("teacher") / "run"
    seen = []
    evaluate = finetune.evaluate

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).device.type)
        return evaluate(model, *args, **kwargs)

    finetune.evaluate = spy
    try:
        assert student_main("finetune", "--model", "test_vit", "--data", data["train"], "--val-data", data["test"],
                            "--labels-per-class", "32", "--epochs", "3", "--image-size", SIZE, "--batch-size", 32,
                            "--lr", "0.003", "--workers", 2, "--out", out) == 0
    finally:
        finetune.evaluate = evaluate
    assert seen == [DEVICE]
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["n"] == 96 and sum(map(sum, metrics["confusion_matrix"])) == 96
    assert metrics["classes"] == CLASSES
    return out / "checkpoint"


@pytest.fixture(scope="module")
def cache(data, teacher, tmp_path_factory):
    from kt.teacher_cache.build import BuildConfig, build_cache

    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    summary = build_cache(BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(out), views=2,
                                      targets=["logits", "embedding", "patches"], batch_size=64, workers=2,
                                      codec=["logits=fp16", "embedding=fp16", "patches=fp16"]))
    assert summary["device"].split(":")[0] == DEVICE
    assert summary["teacher_dtype"] == ("bfloat16" if DEVICE == "cuda" else "float32")
    assert summary["samples"] == 256 and summary["bad"] == 0
    assert set(summary["time_s"]) == {"loader_wait", "teacher", "teacher_wait", "writer", "first_batch"}
    assert summary["teacher_graph"] is (DEVICE == "cuda")
    assert summary["steady_views_per_s"] > 0
    return out


def same_shards(cache_a, cache_b, urls):
    """(shard of a, shard of b) per input shard of two caches of the same data: same keys, same view params."""
    from kt.teacher_cache.reader import CacheReader

    targets = ["logits", "embedding", "patches"]
    a, b = CacheReader(str(cache_a)), CacheReader(str(cache_b))
    for url in urls:
        sa, sb = a.shard(url, targets), b.shard(url, targets)
        assert list(sa.keys) == list(sb.keys)
        np.testing.assert_array_equal(sa.params, sb.params)
        yield sa, sb


def test_uint8_views_normalised_on_the_device_give_the_float_views_cache(data, teacher, cache, tmp_path,
                                                                         monkeypatch):
    """The default (workers send uint8 views, normalised on the teacher's GPU) against float views made in
    the workers: the teacher's inputs are the same bits (tests/test_build_data_path.py), so are its outputs."""
    import kt.render
    import kt.teacher_cache.build as build

    monkeypatch.setattr(kt.render, "UINT8_VIEWS", "never")
    out = tmp_path / "f32.zarr"
    build.build_cache(build.BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(out), views=2,
                                        targets=["logits", "embedding", "patches"], batch_size=64, workers=2,
                                        codec=["logits=fp16", "embedding=fp16", "patches=fp16"]))
    worst = 0.0
    for sa, sb in same_shards(cache, out, data["train_urls"]):
        for t in sa.targets:
            worst = max(worst, float(np.abs(sa.targets[t] - sb.targets[t]).max()))
    print("uint8 vs float views, largest stored difference:", worst)
    assert worst == 0.0


def test_teacher_graph_gives_the_eager_teachers_cache(data, teacher, cache, tmp_path):
    """The default build replays the teacher as a CUDA graph; `--no-teacher-graph` runs it op by op."""
    from kt.teacher_cache.build import BuildConfig, build_cache

    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    out = tmp_path / "eager.zarr"
    summary = build_cache(BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(out), views=2,
                                      targets=["logits", "embedding", "patches"], batch_size=64, workers=2,
                                      codec=["logits=fp16", "embedding=fp16", "patches=fp16"], teacher_graph=False))
    assert summary["teacher_graph"] is False
    worst = 0.0
    for sa, sb in same_shards(cache, out, data["train_urls"]):
        for t in sa.targets:
            np.testing.assert_allclose(sa.targets[t], sb.targets[t], rtol=1e-2, atol=1e-2)
            worst = max(worst, float(np.abs(sa.targets[t] - sb.targets[t]).max()))
    print("graph vs eager teacher, largest stored difference:", worst)


def test_patches_encoded_on_the_gpu_match_the_hosts_encoding(data, teacher, tmp_path):
    """`--device-encode` (auto: on with CUDA) encodes the patch grid on the GPU before its copy back; against the
    host's numpy encoding of the same outputs: int8 coefficients within one step (a float32 matmul summed in
    another order, TF32 off), everything else the same."""
    from kt.teacher_cache.build import BuildConfig, build_cache
    from tests.test_cache_cli import arrays

    stores = {}
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.zarr"
        build_cache(BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(out), views=2,
                                targets=["logits", "embedding", "patches"], batch_size=64, workers=2,
                                codec=["patches=pca:d=16,int8"], device_encode=mode, fit_views=64))
        stores[mode] = arrays(out)
    on, off = stores["on"], stores["off"]
    assert sorted(on) == sorted(off)
    for path in on:
        if "patches/coeffs" in path:
            assert np.abs(on[path].astype(np.int16) - off[path].astype(np.int16)).max() <= 1, path
        elif "patches/scale" in path:
            np.testing.assert_allclose(on[path], off[path], rtol=1e-4)
        elif not path.endswith("/checksums"):
            np.testing.assert_array_equal(on[path], off[path], err_msg=path)


def test_a_fresh_gpu_build_writes_what_a_resumed_one_does(data, teacher, tmp_path):
    """With patches encoded on the GPU, the views a fresh build holds raw for its PCA fit are encoded there
    too: the store equals, byte for byte, the one a build resumed after the fit writes (every view encoded on
    the GPU), though GPU and host encoders differ in the last bits."""
    from kt.teacher_cache.build import BuildConfig, build_cache
    from tests.test_cache_cli import arrays

    if DEVICE != "cuda":
        pytest.skip("device encoding is the CUDA default")
    out = tmp_path / "fresh.zarr"
    cfg = BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(out), views=2,
                      targets=["logits", "embedding", "patches"], batch_size=64, workers=2,
                      codec=["patches=pca:d=16,int8"], fit_views=64)
    build_cache(cfg)
    fresh = arrays(out)
    for marker in (out / "complete").glob("*/zarr.json"):  # resumed after the fit: codec states kept, shards redone
        marker.unlink()
    build_cache(cfg)
    resumed = arrays(out)
    assert sorted(fresh) == sorted(resumed)
    for path in fresh:
        np.testing.assert_array_equal(fresh[path], resumed[path], err_msg=path)


def test_graphed_teacher_replays_a_short_batch_as_rows_of_a_full_one(teacher):
    from kt.checkpoints import load_checkpoint
    from kt.device import placement
    from kt.models import teacher_targets
    from kt.teacher_cache.build import GraphedTeacher

    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    place = placement("cuda")
    model = load_checkpoint(teacher).eval().to("cuda")
    g = GraphedTeacher(model, ["logits", "embedding"], place, 16, SIZE)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 3, SIZE, SIZE, generator=gen).cuda() for _ in range(2))
    full = {t: v.clone() for t, v in g(b).items()}
    g(a)  # the static input now holds a's rows
    short = g(b[:5])  # rows 5.. keep a's data: dropped
    for t in full:
        assert short[t].shape[0] == 5
        assert torch.equal(short[t], full[t][:5])
    with torch.inference_mode(), place.teacher_autocast():
        eager = teacher_targets(model, b, ["logits", "embedding"])
    for t in full:
        torch.testing.assert_close(full[t], eager[t].float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError):
        g(torch.zeros(17, 3, SIZE, SIZE, device="cuda"))


def test_the_render_and_normalisation_never_wait_for_the_gpu():
    """Neither the batched render nor `normalize` synchronises the stream: blocking uploads of their small host
    tensors (and a bincount, which sizes its output from the data) did, so the host waited for the teacher's
    forward of the batch in flight before it could render or queue the next one. torch's sync debug mode
    makes any synchronising call an error. Every RandAugment op is present, one per view."""
    from kt.render import normalize
    from kt.render_tensor import render_batch
    from kt.views import RANDAUG_OPS, VIEW_PRESETS, sample_params

    if DEVICE != "cuda":
        pytest.skip("stream synchronisation is a CUDA matter")
    params = []
    for i, op in enumerate(RANDAUG_OPS * 2):
        p = sample_params(VIEW_PRESETS["train"], 0, f"v{i}", 0)
        p[9:] = -1
        p[9], p[10] = RANDAUG_OPS.index(op), {"Solarize": 128, "Posterize": 4}.get(op, 0.3 if i % 2 else 1.8)
        params.append(p)
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randint(0, 256, (3, 40 + i % 3, 48), dtype=torch.uint8, generator=gen).cuda()
               for i in range(len(params))]
    views = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = render_batch(sources, np.stack(params), SIZE, (0.5,) * 3, (0.25,) * 3)
        y = normalize(views, (0.5,) * 3, (0.25,) * 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.shape == (len(params), 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_build_loader_pins_its_view_batches(data):
    """The DataLoader pins what has a `pin_memory` method: without one a ViewBatch reached the GPU unpinned,
    and `non_blocking` copies from it were synchronous."""
    from kt.teacher_cache.build import ViewBatch, view_loader
    from kt.views import ViewSet, load_view_spec

    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    for uint8 in (False, True):
        loader = view_loader(data["train_urls"][:1], ViewSet(load_view_spec("train"), 0, 1), SIZE,
                             (0.5,) * 3, (0.5,) * 3, 16, workers=1, pin_memory=True, uint8=uint8)
        batch = next(b for b in loader if isinstance(b, ViewBatch))
        assert batch.x.is_pinned() and batch.x.dtype == (torch.uint8 if uint8 else torch.float32)


def test_cached_targets_match_an_fp32_cpu_forward(data, teacher, cache):
    """Every cached view against the fp32 CPU teacher on the same replayed pixels."""
    from kt.checkpoints import load_checkpoint
    from kt.shards import iter_samples
    from kt.teacher_cache.reader import CacheReader
    from kt.views import render, to_tensor

    model = load_checkpoint(teacher).float().eval()
    reader = CacheReader(str(cache))
    images = {s.key: s.image for s in iter_samples(data["train_urls"])}
    kl, top1, cos_e, cos_p = [], [], [], []
    for url in data["train_urls"]:
        shard = reader.shard(url, ["logits", "embedding", "patches"])
        for v in range(reader.views_per_image):
            x = torch.stack([to_tensor(render(images[k], shard.params[r, v], SIZE), model.mean, model.std)
                             for r, k in enumerate(shard.keys)])
            with torch.no_grad():
                fresh = model.forward_features(x)
            logits = shard.targets["logits"][:, v]
            kl.append(kl_rows(fresh["logits"].numpy(), logits))
            top1.append(fresh["logits"].numpy().argmax(1) == logits.argmax(1))
            cos_e.append(cosine_rows(fresh["embedding"].numpy(), shard.targets["embedding"][:, v]))
            cos_p.append(cosine_rows(fresh["grid"].permute(0, 2, 3, 1).reshape(-1, model.grid_dim).numpy(),
                                     shard.targets["patches"][:, v].reshape(-1, model.grid_dim)))
    kl, top1, cos_e, cos_p = map(np.concatenate, (kl, top1, cos_e, cos_p))
    report = {"kl_mean": kl.mean(), "kl_max": kl.max(), "top1": top1.mean(), "embedding_cos_mean": cos_e.mean(),
              "embedding_cos_min": cos_e.min(), "patches_cos_mean": cos_p.mean(), "patches_cos_min": cos_p.min()}
    print("bf16-vs-fp32 fidelity (tiny teacher):", json.dumps({k: float(v) for k, v in report.items()}))
    assert len(kl) == 256 * 2
    assert kl.mean() < MAX_MEAN_KL and top1.mean() >= MIN_TOP1_AGREEMENT
    assert cos_e.mean() > MIN_MEAN_COSINE and cos_e.min() > MIN_COSINE
    assert cos_p.mean() > MIN_MEAN_COSINE and cos_p.min() > MIN_COSINE


TRAIN = ("--model", "test_efficientnet", "--objective", "task", "--image-size", SIZE, "--batch-size", 32,
         "--lr", "0.003", "--workers", 2, "--log-every", 1)


@pytest.fixture(scope="module")
def distilled(data, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "run"
    assert student_main("train", *TRAIN, "--cache", cache, "--data", data["train"], "--epochs", 4, "--out", out) == 0
    return out


def test_distillation_on_the_device_matches_a_cpu_run_and_learns(data, cache, distilled, tmp_path):
    """Same command on the CPU (a fresh process that cannot see the GPU): same first losses, then it learns."""
    ref = tmp_path / "cpu"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "kt.student.cli", "train", *map(str, TRAIN), "--cache", str(cache),
           "--data", str(data["train"]), "--epochs", "4", "--stop-after-steps", "3", "--out", str(ref)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    on_device, on_cpu = losses(distilled), losses(ref)
    # step 1 is the initial weights on the same batch: only the arithmetic differs (TF32 convolutions)
    np.testing.assert_allclose(on_device[0], on_cpu[0], rtol=1e-2)
    np.testing.assert_allclose(on_device[:3], on_cpu[:3], rtol=5e-2)
    steps = len(on_device) // 4  # four epochs
    assert np.mean(on_device[-steps:]) < 0.8 * np.mean(on_device[:steps])


def test_online_teacher_on_the_device_gives_the_cached_losses(data, teacher, distilled, tmp_path):
    """Teacher in the step (bf16 autocast on CUDA) vs the cache (bf16 at build, fp16 stored): same views."""
    out = tmp_path / "online"
    assert student_main("train", *TRAIN, "--teacher", teacher, "--views", 2, "--data", data["train"],
                        "--epochs", 4, "--stop-after-steps", 4, "--out", out) == 0
    np.testing.assert_allclose(losses(out), losses(distilled)[:4], rtol=3e-2, atol=2e-3)


def test_render_on_the_device_gives_the_workers_losses(data, teacher, distilled, tmp_path):
    """`--render cuda`: the workers only decode, the student's GPU renders each batch (and the online
    teacher's views) from the stored params; the views are the PIL views within 1/255, so are the losses."""
    if DEVICE != "cuda":
        pytest.skip("--render cuda needs CUDA")
    out = tmp_path / "rendered"
    assert student_main("train", *TRAIN, "--render", "cuda", "--teacher", teacher, "--views", 2,
                        "--data", data["train"], "--epochs", 4, "--stop-after-steps", 4, "--out", out) == 0
    np.testing.assert_allclose(losses(out), losses(distilled)[:4], rtol=3e-2, atol=2e-3)


def test_finetune_init_in_mixed_precision_then_eval(data, distilled, tmp_path, capsys):
    """finetune --init (bf16 mixed precision) evaluates on the device; kt-student eval on the device and on
    the CPU agree."""
    out = tmp_path / "student"
    assert student_main("finetune", "--init", distilled, "--data", data["train"], "--val-data", data["test"],
                        "--labels-per-class", 16, "--epochs", 2, "--image-size", SIZE, "--batch-size", 16,
                        "--mixed-precision", "bf16" if DEVICE == "cuda" else "no", "--workers", 2,
                        "--out", out) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["completed"] and 0.0 <= summary["top1"] <= 1.0
    results = {}
    for device in (DEVICE, "cpu"):
        assert student_main("eval", "--checkpoint", out, "--data", data["test"], "--device", device,
                            "--workers", 2) == 0
        results[device] = json.loads(capsys.readouterr().out)
    for r in results.values():
        assert r["n"] == 96 and r["classes"] == CLASSES and len(r["per_class_accuracy"]) == 4
    diff = np.abs(np.array(results[DEVICE]["confusion_matrix"]) - np.array(results["cpu"]["confusion_matrix"]))
    assert diff.sum() <= 2 * 2  # at most two predictions flip on a near-tie (TF32 vs fp32)


def test_retrieval_embed_on_the_device_matches_an_fp32_cpu_forward(data, tmp_path):
    from kt.models import create_model
    from kt.retrieval.embed import RANDOM_INIT_SEED, embed_images
    from kt.retrieval.embeddings import load_embeddings
    from kt.shards import iter_samples
    from kt.views import VIEW_PRESETS, render, sample_params, to_tensor

    out = tmp_path / "g.emb"
    summary = embed_images("test_vit", str(data["test"]), str(out), pretrained="none", image_size=SIZE,
                           batch_size=32, device=DEVICE)
    assert summary["device"].split(":")[0] == DEVICE and summary["samples"] == 96
    emb = load_embeddings(out)
    torch.manual_seed(RANDOM_INIT_SEED)
    model = create_model("test_vit", pretrained="none", image_size=SIZE).eval()
    samples = {s.key: s.image for s in iter_samples(data["test_urls"])}
    keys = [str(k) for k in emb.keys]
    x = torch.stack([to_tensor(render(samples[k], sample_params(VIEW_PRESETS["eval"], 0, k, 0), SIZE),
                               model.mean, model.std) for k in keys])
    with torch.no_grad():
        ref = model.forward_features(x)["embedding"].numpy()
    cos = cosine_rows(emb.read(0, len(emb)), ref)
    print("embed bf16-vs-fp32 cosine: mean", float(cos.mean()), "min", float(cos.min()))
    assert cos.mean() > MIN_MEAN_COSINE and cos.min() > MIN_COSINE
