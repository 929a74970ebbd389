"""The fast renders (kt.render: reduced JPEG decode, composed affine maps) against the first
implementation (tests/render_reference.py): mean absolute difference <= 1/255 over a test set of views,
bit-exact where nothing was composed, masks aligned, parameters unchanged."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from kt.render import REDUCING_GAP, crop_map, decode_for_views, plan, render, render_mask, to_tensor
from kt.shards import decode_image
from kt.views import GEOMETRIC_OPS, RANDAUG_OPS, VIEW_PRESETS, sample_params, sample_params_batch
from tests import render_reference as ref

SIZES = (224, 64, (48, 32))
SPECS = ("train", "light", "eval")


@pytest.fixture(scope="module")
def sources() -> dict[str, dict[str, bytes]]:
    return {name: {fmt: ref.encode(img, fmt) for fmt in ("JPEG", "PNG")} for name, img in ref.photos().items()}


def _views(spec: str, n: int) -> np.ndarray:
    return sample_params_batch(VIEW_PRESETS[spec], 11, [f"img/{i:04d}" for i in range(n)], [i % 4 for i in range(n)])


def test_sample_params_unchanged():
    # Recorded before kt.render existed: the stored parameters (and what caches hold) must not move.
    h = hashlib.sha256()
    for name in ("train", "light", "eval"):
        h.update(sample_params_batch(VIEW_PRESETS[name], 3, [f"s/{i:05d}" for i in range(64)],
                                     [i % 4 for i in range(64)]).tobytes())
    assert h.hexdigest() == "5ce72284ff668defcc26ca6179e209519bafde36d244808b4d0e3a03e7284e20"


@pytest.mark.parametrize("spec", SPECS)
def test_renders_match_reference_within_one_level(sources, spec):
    """Over photos x {JPEG, PNG} x sizes x views: the new pipeline (reduced decode where allowed, composed
    affine maps) differs from the reference on the fully decoded image by MAD <= 1/255 per group."""
    views = _views(spec, 12)
    worst = 0.0
    for name, encoded in sources.items():
        for fmt, data in encoded.items():
            full = decode_image(data)
            for size in SIZES:
                diffs = []
                for p in views:
                    fast = render(decode_for_views(data, p, size), p, size)
                    diffs.append(ref.mad(fast, ref.render(full, p, size)))
                assert np.mean(diffs) <= 1.0, (name, fmt, size, np.round(diffs, 2))
                # no view is wrong outright; the largest single-view differences (~7/255 at 32 px) are views with two
                # geometric ops in a row, resampled once instead of twice
                assert max(diffs) <= 8.0, (name, fmt, size, np.round(diffs, 2))
                worst = max(worst, float(np.mean(diffs)))
    print(f"{spec}: worst group MAD {worst:.3f}/255")


def test_bit_exact_without_composition(sources):
    """Where nothing was composed or reduced (no geometric op, a crop shrunk by less than REDUCING_GAP, a
    full decode): bit for bit, the table-driven colour ops included."""
    full = decode_image(sources[next(iter(sources))]["PNG"])
    n = 0
    for p in _views("train", 60):
        if any(RANDAUG_OPS[int(i)] in GEOMETRIC_OPS for i in p[9::2] if i >= 0):
            continue
        for size in (224, 96):
            if max(crop_map(full, p, (size, size))[::4]) >= REDUCING_GAP:
                continue
            assert render(full, p, size).tobytes() == ref.render(full, p, size).tobytes()
            n += 1
    assert n > 30


def _forced(ops: list[tuple[str, float]], flip: int, view: int = 0) -> np.ndarray:
    p = sample_params(VIEW_PRESETS["train"], 0, "forced", view)
    p[4] = flip
    p[9:] = -1
    for k, (name, arg) in enumerate(ops):
        p[9 + 2 * k], p[10 + 2 * k] = RANDAUG_OPS.index(name), arg
    return p


COMPOSED = [
    [("Rotate", 27.0), ("ShearX", -0.27)],
    [("TranslateY", 0.4), ("Rotate", -15.0)],
    [("ShearY", 0.2), ("TranslateX", -0.3), ("Rotate", 10.0)],
    [("Rotate", 20.0), ("Solarize", 100.0), ("ShearX", 0.2)],  # not composed across a photometric op
]


@pytest.mark.parametrize("ops", COMPOSED, ids=lambda o: "+".join(n for n, _ in o))
def test_composed_geometric_runs(sources, ops):
    full = decode_image(sources[next(iter(sources))]["PNG"])
    for flip in (0, 1):
        p = _forced(ops, flip)
        runs = [k for k, _ in plan(p, 64, 64) if k == "affine"]
        assert len(runs) == (2 if ops[1][0] == "Solarize" else 1)
        assert "flip" not in [k for k, _ in plan(p, 64, 64)]  # folded into the affine map
        for size in (224, 64):
            # the blur of the one or two resamples saved; a clipping error (grey bands lost) gives 15-30
            assert ref.mad(render(full, p, size), ref.render(full, p, size)) <= 4.0


def test_masks_follow_the_same_geometry():
    y, x = np.mgrid[0:160, 0:160]
    labels = ((x // 20 + 3 * (y // 40)) % 11).astype(np.uint8)
    mask = Image.fromarray(labels)
    for p in _views("train", 24):
        out = np.asarray(render_mask(mask, p, 64))
        expect = np.asarray(ref.render_mask(mask, p, 64))
        n_geo = sum(RANDAUG_OPS[int(i)] in GEOMETRIC_OPS for i in p[9::2] if i >= 0)
        if n_geo == 0:
            np.testing.assert_array_equal(out, expect)
        else:  # one nearest resample (crop joined to the run) instead of two or three: only pixels on label edges move
            assert (out == expect).mean() > 0.94  # labels 8 px wide here: ~1 pixel in 8 sits on an edge
    for ops in COMPOSED:
        p = _forced(ops, 1)
        out, expect = np.asarray(render_mask(mask, p, 64)), np.asarray(ref.render_mask(mask, p, 64))
        assert (out == expect).mean() > 0.94
        # the image path shows the same geometry: a label image rendered as RGB agrees with the mask
        p = _forced([o for o in ops if o[0] in GEOMETRIC_OPS], 1)
        out = np.asarray(render_mask(mask, p, 64))
        p[5:8] = 1.0  # no colour jitter or photometric op, so pixel values still name labels
        img = np.asarray(render(Image.fromarray(labels * 20).convert("RGB"), p, 64))[..., 0].astype(int)
        valid = out != 255
        assert (np.abs(img[valid] - out[valid].astype(int) * 20) < 15).mean() > 0.9


def test_reduced_decode_is_used_and_placed_exactly(sources):
    data = sources["chelsea_500x375"]["JPEG"] if "chelsea_500x375" in sources else next(iter(sources.values()))["JPEG"]
    p = sample_params(VIEW_PRESETS["eval"], 0, "k", 0)
    small = decode_for_views(data, p, 48)
    assert small.size[0] < Image.open(io.BytesIO(data)).size[0]  # decoded at 1/2 .. 1/8
    big = decode_for_views(data, p, 224)
    assert big.size == Image.open(io.BytesIO(data)).size  # a 224 view of a 500 px image needs every pixel
    # several views: the narrowest crop decides
    views = _views("train", 8)
    multi = decode_for_views(data, views, 64)
    for q in views:
        assert ref.mad(render(multi, q, 64), ref.render(decode_image(data), q, 64)) <= 2.0
    with pytest.raises(OSError):
        decode_for_views(data[: len(data) // 2], p, 48)  # truncation is caught at reduced scale too
    png = sources[next(iter(sources))]["PNG"]
    assert decode_for_views(png, p, 16).size == Image.open(io.BytesIO(png)).size


def test_to_tensor_matches_reference():
    torch = pytest.importorskip("torch")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    expect = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    got = to_tensor(img, mean, std)
    assert got.shape == (3, 40, 30) and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got, expect, atol=2e-6, rtol=0)


def test_crop_joins_the_geometric_run(sources, monkeypatch):
    """A view with a geometric op whose crop shrinks by at most COMPOSE_MAX_SHRINK is ONE resample of the
    source (crop, flip, rotate/shear/translate composed); its mask is one nearest resample too."""
    from kt.render import COMPOSE_MAX_SHRINK

    full = decode_image(sources[next(iter(sources))]["PNG"])
    import kt.render

    calls: list[tuple[str, str, int]] = []
    real_resize, real_transform = Image.Image.resize, kt.render.transform
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: (
        calls.append(("resize", self.mode, k.get("resample"))) if self.size == full.size else None)
        or real_resize(self, *a, **k))
    # every affine resample of the render goes through kt.render.transform (PIL's, or OpenCV's twin of it)
    monkeypatch.setattr(kt.render, "transform", lambda img, size, matrix, resample, fill: (
        calls.append(("transform", img.mode, resample)) if img.size == full.size else None)
        or real_transform(img, size, matrix, resample, fill))
    p = _forced([("Rotate", 20.0), ("ShearX", 0.2)], flip=1)
    assert max(crop_map(full, p, (224, 224))[::4]) <= COMPOSE_MAX_SHRINK
    render(full, p, 224)
    # the source is resampled once; a 64 px nearest-neighbour proxy of the crop feeds Contrast's mean
    assert [c for c in calls if c[2] != Image.Resampling.NEAREST] == [("transform", "RGB", Image.Resampling.BILINEAR)]
    assert calls.count(("resize", "RGB", Image.Resampling.NEAREST)) <= 1
    calls.clear()
    render_mask(full.convert("P"), p, 224)
    assert calls == [("transform", "P", Image.Resampling.NEAREST)], calls


def test_opencv_warp_is_pils_bilinear_transform(sources):
    """`kt.render.transform` runs an RGB bilinear transform through OpenCV: against PIL's own `transform` on
    photos and maps that zoom, rotate, shear and leave the frame (fill), nearly every pixel is the same
    (PIL's floating-point interpolation and truncation reproduced; cv2's uint8 warp alone is 0.3/255 off)."""
    from kt.render import FILL, _warp_bilinear

    pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    images = [decode_image(encoded["JPEG"]).convert("RGB") for encoded in sources.values()]
    images.append(images[0].resize((61, 47)))  # small and odd-sized: the edge and fill rules dominate
    differ, total, filled = 0, 0, 0
    for img in images:
        W, H = img.size
        for size in ((224, 224), (64, 64), (48, 32)):
            for _ in range(6):
                angle, zoom = np.radians(rng.uniform(-35, 35)), rng.uniform(0.3, 2.5) * max(W, H) / max(size)
                c, s = np.cos(angle) * zoom, np.sin(angle) * zoom
                m = (c, s + rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.8) * W, -s, c, rng.uniform(-0.3, 0.8) * H)
                expect = np.asarray(img.transform(size, Image.Transform.AFFINE, m, resample=Image.Resampling.BILINEAR,
                                                  fillcolor=FILL)).astype(int)
                got = np.asarray(_warp_bilinear(img, size, m, FILL)).astype(int)
                diff = np.abs(got - expect)
                assert diff.mean() < 0.02, (img.size, size, m, diff.mean())
                differ += int((diff > 0).sum())
                total += diff.size
                filled += int((expect == FILL[0]).all(-1).sum())
    assert differ / total < 1e-3, differ / total
    assert filled > total // 30  # the maps did leave the frame: the fill rule was tested


def test_small_outputs_and_large_sources_keep_pils_transform(sources, monkeypatch):
    """OpenCV only where it is the cheaper one: outputs of at least WARP_MIN_PIXELS that read at most
    WARP_MAX_SOURCE times their own pixels from the source; PIL's transform elsewhere."""
    import kt.render
    from kt.render import FILL, transform

    def no_opencv():
        raise AssertionError("OpenCV used")

    img = decode_image(sources[next(iter(sources))]["JPEG"]).convert("RGB")
    monkeypatch.setattr(kt.render, "_cv2", no_opencv)
    bilinear = Image.Resampling.BILINEAR
    zoom = (1.2, 0.1, 10.0, -0.1, 1.2, 10.0)  # a mild zoom: the source region ~1.5x the output
    transform(img, (64, 64), zoom, bilinear, FILL)  # small output: PIL
    transform(img, (224, 224), zoom, Image.Resampling.NEAREST, FILL)  # not bilinear: PIL
    transform(img.convert("L"), (224, 224), zoom, bilinear, 0)  # not RGB: PIL
    shrink = (3.0, 0.0, 0.0, 0.0, 3.0, 0.0)  # reads 9x the output's pixels: PIL
    transform(img, (128, 128), shrink, bilinear, FILL)
    with pytest.raises(AssertionError, match="OpenCV used"):
        transform(img, (224, 224), zoom, bilinear, FILL)


def test_without_opencv_the_render_is_pils(sources, monkeypatch):
    """OpenCV is a speed-up only: where it does not import, `transform` is PIL's, pixel for pixel."""
    import kt.render
    from kt.render import FILL, transform

    img = decode_image(sources[next(iter(sources))]["JPEG"]).convert("RGB")
    monkeypatch.setattr(kt.render, "_CV2", [None])
    m = (1.2, 0.3, -20.0, -0.3, 1.2, 40.0)
    got = transform(img, (224, 224), m, Image.Resampling.BILINEAR, FILL)
    expect = img.transform((224, 224), Image.Transform.AFFINE, m, resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    assert got.tobytes() == expect.tobytes()
