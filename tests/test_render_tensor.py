"""The batched tensor render (kt.render_tensor, the GPU path) against the PIL render on the same stored
parameters: MAD <= 1/255 per group of views. Runs on CPU tensors here; the `gpu` test repeats it on
CUDA with nvJPEG decoding (`make gpu-check`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kt.render import render
from kt.render_tensor import decode_batch, images_to_tensors, render_batch
from kt.views import RANDAUG_OPS, VIEW_PRESETS, ViewSet, sample_params, sample_params_batch
from tests import render_reference as ref


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: img.convert("RGB") for name, img in ref.photos().items()}


def _compare(images: list[Image.Image], sources: list[torch.Tensor], params: np.ndarray, size) -> list[float]:
    got = render_batch(sources, params, size).cpu().permute(0, 2, 3, 1).numpy()
    return [ref.mad(g, render(img, p, size)) for g, img, p in zip(got, images, params)]


def _check_specs(photos, device, views: int = 12, sizes=(224, 64, (48, 32))):
    for spec in ("train", "light", "eval"):
        params = sample_params_batch(VIEW_PRESETS[spec], 5, [f"t/{i}" for i in range(views)],
                                     [i % 4 for i in range(views)])
        for name, img in photos.items():
            sources = images_to_tensors([img] * len(params), device)
            for size in sizes:
                diffs = _compare([img] * len(params), sources, params, size)
                assert np.mean(diffs) <= 1.0, (spec, name, size, np.round(diffs, 2))
                assert max(diffs) <= 3.0, (spec, name, size, np.round(diffs, 2))


def test_tensor_render_matches_pil_on_cpu(photos):
    # the tensor path on CPU is a reference check, not a fast path (PIL is faster on one core): kept small
    name = next(iter(photos))
    _check_specs({name: photos[name]}, "cpu", views=8, sizes=(64, (48, 32)))


@pytest.mark.slow
def test_tensor_render_matches_pil_on_cpu_full(photos):
    _check_specs(photos, "cpu")


@pytest.mark.parametrize("op", RANDAUG_OPS)
def test_each_op_matches_pil(photos, op):
    img = next(iter(photos.values()))
    p = sample_params(VIEW_PRESETS["train"], 0, "op", 0)
    p[9:] = -1
    p[9] = RANDAUG_OPS.index(op)
    p[10] = {"Rotate": 27, "ShearX": 0.27, "ShearY": -0.27, "TranslateX": 0.4, "TranslateY": -0.4,
             "Solarize": 128, "Posterize": 4}.get(op, 1.8)
    for flip in (0, 1):
        p[4] = flip
        diffs = _compare([img], images_to_tensors([img], "cpu"), p[None], 64)
        assert diffs[0] <= 1.0, (op, flip, diffs)


def test_normalised_output_matches_to_tensor(photos):
    from kt.render import to_tensor

    img = next(iter(photos.values()))
    p = sample_params(VIEW_PRESETS["light"], 0, "n", 0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = render_batch(images_to_tensors([img], "cpu"), p[None], 32, mean=mean, std=std)[0]
    u8 = render_batch(images_to_tensors([img], "cpu"), p[None], 32)[0]
    expect = to_tensor(Image.fromarray(u8.permute(1, 2, 0).numpy()), mean, std)
    torch.testing.assert_close(x, expect, atol=1e-5, rtol=0)


def test_decode_batch_matches_pil_decode(photos):
    img = next(iter(photos.values()))
    for fmt in ("PNG", "JPEG"):
        data = ref.encode(img, fmt)
        got = decode_batch([data], "cpu")[0].permute(1, 2, 0).numpy()
        from kt.shards import decode_image

        assert ref.mad(got, decode_image(data).convert("RGB")) <= (0.0 if fmt == "PNG" else 1.0)


@pytest.mark.gpu
def test_tensor_render_matches_pil_on_cuda(photos):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check_specs(photos, "cuda")
    img = next(iter(photos.values()))
    data = ref.encode(img, "JPEG")
    decoded = decode_batch([data, ref.encode(img, "PNG")], "cuda")
    assert all(t.device.type == "cuda" for t in decoded)
    from kt.shards import decode_image

    assert ref.mad(decoded[0].cpu().permute(1, 2, 0).numpy(), decode_image(data).convert("RGB")) <= 1.5



@pytest.fixture(scope="module")
def photo_shard(photos, tmp_path_factory) -> str:
    """One shard of 40 crops of the bundled photographs (mixed sizes): no dataset needed, so the gpu
    variant runs on a lent machine without Fashion-MNIST."""
    from kt.shards import write_shards

    rng = np.random.default_rng(0)
    imgs = list(photos.values())

    def crops():
        for i in range(40):
            img = imgs[i % len(imgs)]
            w, h = int(rng.integers(40, 120)), int(rng.integers(40, 120))
            x, y = int(rng.integers(0, img.width - w)), int(rng.integers(0, img.height - h))
            yield f"crop-{i:03d}", img.crop((x, y, x + w, y + h)), i % 3

    return write_shards(crops(), tmp_path_factory.mktemp("photo_shard"), prefix="photos", maxcount=100)[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_build_batches_rendered_on_device_match_worker_renders(photo_shard, device):
    """The cache build's GPU path (workers decode, one render_batch in the main process), on CPU tensors
    and, marked gpu, on CUDA: the same views as the DataLoader workers' PIL renders."""
    from kt.render_tensor import render_device_for
    from kt.teacher_cache.build import ShardViewBatches, ViewBatch

    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        assert render_device_for("cuda", "cuda:0") == torch.device("cuda:0")
        # measured: the build is no faster with it (docs/benchmarks.md, "Data path")
        assert render_device_for("auto", "cuda:0") is None
    else:
        assert render_device_for("cpu") is None and render_device_for("auto", "cpu") is None
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    args = ([photo_shard], ViewSet(VIEW_PRESETS["train"], 0, 2), 32, mean, std, 20)
    pil = [b for b in ShardViewBatches(*args) if isinstance(b, ViewBatch)]
    dev = [b for b in ShardViewBatches(*args, device_render=True) if isinstance(b, ViewBatch)]
    assert len(pil) == len(dev) and all(isinstance(b.x, list) for b in dev)
    for a, b in zip(pil, dev):
        np.testing.assert_array_equal(a.params, b.params)
        x = render_batch([t.to(device) for t in b.x], b.params, 32, mean=mean, std=std).cpu()
        levels = (x - a.x).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255
        assert float(levels.mean()) <= 1.0


def test_render_choice_is_checked(fmnist, tmp_path, capsys):
    from kt.teacher_cache.cli import main

    assert main(["build", "--teacher", "test_vit", "--data", fmnist["train"][0], "--out", str(tmp_path / "c"),
                 "--targets", "embedding", "--render", "gpu"]) == 2
    assert "--render 'gpu': must be one of auto, cpu, cuda" in capsys.readouterr().err


def test_render_batch_is_batched(photos, monkeypatch):
    """One batched resample per op slot, whatever the batch size (the per-image path launched one chain of
    small kernels per view and was launch-bound on the GPU), and still the PIL render's pixels."""
    import torch.nn.functional as F

    calls = []
    real = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    img = next(iter(photos.values()))
    params = sample_params_batch(VIEW_PRESETS["train"], 1, [f"b/{i}" for i in range(24)], 0)
    params[:, 9], params[:, 10] = RANDAUG_OPS.index("Rotate"), 20.0  # every view: a geometric op in slot 0
    params[:, 11] = np.where(np.arange(24) % 2, RANDAUG_OPS.index("ShearX"), RANDAUG_OPS.index("Solarize"))
    params[:, 12] = np.where(np.arange(24) % 2, 0.2, 128.0)
    diffs = _compare([img] * 24, images_to_tensors([img] * 24, "cpu"), params, 48)
    assert calls == [24], calls
    assert np.mean(diffs) <= 1.0 and max(diffs) <= 3.0, np.round(diffs, 2)


def test_batch_of_mixed_sizes(photos):
    """Sources of different sizes in one batch (padded to one tensor) render as each would alone."""
    imgs = list(photos.values())
    batch = [imgs[i % len(imgs)] for i in range(12)]
    params = sample_params_batch(VIEW_PRESETS["train"], 2, [f"m/{i}" for i in range(12)], 0)
    for size in (96, (48, 32)):
        diffs = _compare(batch, images_to_tensors(batch, "cpu"), params, size)
        assert np.mean(diffs) <= 1.0 and max(diffs) <= 3.0, (size, np.round(diffs, 2))


def test_render_is_the_same_under_a_callers_autocast(photos):
    """The render emulates PIL's 8-bit arithmetic in float32; under a student's bf16 autocast (the stream renders
    inside the training step's context) its matmuls would drop to bf16. render_batch turns autocast off."""
    img = next(iter(photos.values()))
    params = sample_params_batch(VIEW_PRESETS["train"], 3, [f"a/{i}" for i in range(6)], 0)
    sources = images_to_tensors([img] * len(params), "cpu")
    plain = render_batch(sources, params, 48, mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = render_batch(sources, params, 48, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
