"""The view replay contract: parameters are a pure function of (spec, seed, key, view), and `render`
shows the same region at any output size."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kt.errors import UserError
from kt.views import (
    GEOMETRIC_OPS,
    MAX_OPS,
    PARAM_DIM,
    RANDAUG_OPS,
    VIEW_FORMAT_VERSION,
    VIEW_PRESETS,
    ViewReplayError,
    ViewSpec,
    check_params,
    check_params_batch,
    load_view_spec,
    param_names,
    render,
    render_mask,
    sample_params,
    sample_params_batch,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = VIEW_PRESETS["train"]
KEYS = [f"shard-000/{i:06d}" for i in range(6)]


def _photo(size: int = 128) -> Image.Image:
    """A real photograph where scikit-image is installed, else a textured synthetic image."""
    try:
        from skimage import data

        return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
    except ImportError:
        y, x = np.mgrid[0:size, 0:size] / size
        rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x * y)], -1)
        return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return _photo()


def _digest(img: Image.Image) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def _views_digest(image_path: str) -> dict:
    """Params and rendered-pixel hashes of a few views; run both in this process and in fresh ones."""
    img = Image.open(image_path)
    img.load()
    out = {}
    for v, key in enumerate(KEYS):
        p = sample_params(VIEW_PRESETS["train"], 7, key, v)
        out[key] = {"params": p.tolist(), "pixels": _digest(render(img, p, 48))}
    return out


def _mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def test_params_shape_names_and_slots():
    p = sample_params(TRAIN, 0, "a", 0)
    assert p.dtype == np.float32 and p.shape == (PARAM_DIM,)
    assert len(param_names()) == PARAM_DIM == 9 + 2 * MAX_OPS
    x0, y0, x1, y1 = p[:4]
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert p[4] in (0.0, 1.0)
    assert np.all((p[5:8] >= 0.6 - 1e-6) & (p[5:8] <= 1.4 + 1e-6))
    ids = p[9::2]
    assert np.all(ids[: TRAIN.randaug_ops] >= 0) and np.all(ids[TRAIN.randaug_ops :] == -1)
    assert set(GEOMETRIC_OPS) <= set(RANDAUG_OPS) and len(RANDAUG_OPS) == 14


def test_params_are_pure_and_depend_on_every_input():
    p = sample_params(TRAIN, 0, "a", 0)
    np.testing.assert_array_equal(p, sample_params(TRAIN, 0, "a", 0))
    others = [
        sample_params(TRAIN, 1, "a", 0),
        sample_params(TRAIN, 0, "b", 0),
        sample_params(TRAIN, 0, "a", 1),
        sample_params(VIEW_PRESETS["light"], 0, "a", 0),
    ]
    for q in others:
        assert not np.array_equal(p[:4], q[:4])
    # Global RNG state is neither read nor changed.
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    np.random.seed(123)
    np.testing.assert_array_equal(p, sample_params(TRAIN, 0, "a", 0))
    np.random.seed(0)
    np.testing.assert_array_equal(before, np.random.get_state()[1])
    batch = sample_params_batch(TRAIN, 0, ["a", "b"], [0, 0])
    np.testing.assert_array_equal(batch[0], p)
    np.testing.assert_array_equal(batch, sample_params_batch(TRAIN, 0, ["a", "b"], 0))


def test_flip_and_randaug_statistics():
    ps = sample_params_batch(TRAIN, 3, [f"k{i}" for i in range(400)], 0)
    assert 0.4 < ps[:, 4].mean() < 0.6
    assert set(np.unique(ps[:, 9]).astype(int)) == set(range(len(RANDAUG_OPS)))
    areas = (ps[:, 2] - ps[:, 0]) * (ps[:, 3] - ps[:, 1])
    assert areas.min() >= 0.08 - 1e-5 and areas.max() <= 1.0 + 1e-5


def test_same_params_and_pixels_in_fresh_processes(photo, tmp_path):
    path = str(tmp_path / "photo.png")
    photo.save(path)
    here = _views_digest(path)
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from tests.test_views import _views_digest; "
        "print(json.dumps(_views_digest(sys.argv[2])))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # str hashing must play no part
    res = subprocess.run([sys.executable, "-c", code, ROOT, path], capture_output=True, text=True, env=env, check=True)
    assert json.loads(res.stdout) == here


class _ViewDataset:
    """Map-style dataset returning a view's params and pixels; picklable for any start method."""

    def __init__(self, image_path: str):
        self.image_path = image_path

    def __len__(self) -> int:
        return len(KEYS)

    def __getitem__(self, i: int):
        img = Image.open(self.image_path).convert("RGB")
        p = sample_params(TRAIN, 7, KEYS[i], i)
        return p, np.array(render(img, p, 32))


def test_dataloader_workers_do_not_change_views(photo, tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "photo.png")
    photo.save(path)

    def collect(num_workers):
        torch.manual_seed(num_workers)  # torch's RNG state must play no part either
        dl = torch.utils.data.DataLoader(_ViewDataset(path), batch_size=2, num_workers=num_workers)
        ps, xs = zip(*[(p.numpy(), x.numpy()) for p, x in dl])
        return np.concatenate(ps), np.concatenate(xs)

    p0, x0 = collect(0)
    p2, x2 = collect(2)
    np.testing.assert_array_equal(p0, p2)
    np.testing.assert_array_equal(x0, x2)


def test_render_shows_same_region_at_any_size(photo):
    # The teacher renders at one size, the student at another: downsampled, they must agree, and agree
    # far better than two different views do.
    same, other = [], []
    for v in range(8):
        p = sample_params(TRAIN, 0, "img", v)
        small = render(photo, p, 64)
        big = render(photo, p, 128).resize((64, 64), Image.Resampling.BICUBIC)
        same.append(_mean_abs(small, big))
        other.append(_mean_abs(small, render(photo, sample_params(TRAIN, 0, "img", v + 100), 64)))
    assert np.median(same) < 4 and max(same) < 20
    assert np.median(other) > 5 * np.median(same)


@pytest.mark.parametrize("op", RANDAUG_OPS)
def test_each_randaug_op_is_size_invariant(photo, op):
    p = sample_params(VIEW_PRESETS["eval"], 0, "x", 0)
    p[9] = RANDAUG_OPS.index(op)
    p[10] = {"Rotate": 27, "ShearX": 0.27, "ShearY": -0.27, "TranslateX": 0.4, "TranslateY": -0.4,
             "Solarize": 128, "Posterize": 4}.get(op, 1.8)
    small = render(photo, p, 64)
    big = render(photo, p, 128).resize((64, 64), Image.Resampling.BICUBIC)
    assert _mean_abs(small, big) < 6


def test_render_is_rgb_at_requested_size_and_deterministic(photo):
    p = sample_params(TRAIN, 0, "g", 2)
    gray = photo.convert("L")
    out = render(gray, p, 40)
    assert out.mode == "RGB" and out.size == (40, 40)
    assert _digest(out) == _digest(render(gray, p, 40))
    assert render(photo, p, (48, 32)).size == (48, 32)
    with pytest.raises(ValueError):
        render(photo, p[:-1], 32)


def test_params_survive_float32_storage_and_spec_json(tmp_path):
    p = sample_params(TRAIN, 5, "k", 3)
    stored = np.frombuffer(p.astype("<f4").tobytes(), dtype="<f4")
    np.save(tmp_path / "p.npy", stored)
    check_params(TRAIN, 5, "k", 3, np.load(tmp_path / "p.npy"))
    spec = ViewSpec.from_dict(json.loads(TRAIN.to_json()))
    assert spec == TRAIN and spec.fingerprint() == TRAIN.fingerprint()
    np.testing.assert_array_equal(sample_params(spec, 5, "k", 3), p)
    # Integers from YAML ([0.08, 1]) give the same spec and fingerprint as floats.
    assert ViewSpec.from_dict({"scale": [0.08, 1], "randaug_magnitude": 9}).fingerprint() == TRAIN.fingerprint()


def test_check_params_raises_on_tampered_vector():
    keys, views = ["a", "b"], [0, 1]
    stored = sample_params_batch(TRAIN, 0, keys, views)
    check_params_batch(TRAIN, 0, keys, views, stored)
    bad = stored.copy()
    bad[1, 0] += 0.01
    with pytest.raises(ViewReplayError, match=r"'b' view 1.*crop_x0"):
        check_params_batch(TRAIN, 0, keys, views, bad)
    with pytest.raises(ViewReplayError):
        check_params(TRAIN, 1, "a", 0, stored[0])  # another seed
    with pytest.raises(ViewReplayError):
        check_params(VIEW_PRESETS["light"], 0, "a", 0, stored[0])  # another spec
    with pytest.raises(ViewReplayError, match="shape"):
        check_params(TRAIN, 0, "a", 0, stored[0][:-2])
    assert issubclass(ViewReplayError, UserError)


def test_eval_view_is_deterministic_and_centred(photo):
    spec = VIEW_PRESETS["eval"]
    p = sample_params(spec, 0, "a", 0)
    for q in (sample_params(spec, 1, "b", 5), sample_params(spec, 9, "a", 0)):
        np.testing.assert_array_equal(p, q)
    c = spec.crop_pct
    np.testing.assert_allclose(p[:4], [(1 - c) / 2, (1 - c) / 2, (1 + c) / 2, (1 + c) / 2], atol=1e-7)
    assert p[4] == 0 and np.all(p[5:8] == 1) and np.all(p[9::2] == -1)
    lo, hi = (1 - c) / 2 * photo.width, (1 + c) / 2 * photo.width
    expected = photo.resize((56, 56), Image.Resampling.BICUBIC, box=(lo, lo, hi, hi))
    assert _digest(render(photo, p, 56)) == _digest(expected)


def test_render_mask_keeps_labels_and_follows_geometry():
    y, x = np.mgrid[0:128, 0:128]
    labels = ((x // 32 + y // 64) % 4 * 3).astype(np.uint8)  # blocks labelled {0, 3, 6, 9}, not mirror-symmetric
    mask = Image.fromarray(labels)
    as_rgb = Image.fromarray(labels * 20)
    for v in range(4):
        p = sample_params(TRAIN, 0, "m", v)
        p[:4] = (0.05, 0.1, 0.9, 0.95)  # most of the image, so a wrong geometry shows
        p[4] = v % 2
        p[5:8], p[11::2] = 1.0, -1.0  # no photometric ops, one geometric op
        p[9], p[10] = RANDAUG_OPS.index("Rotate"), 10.0 + 5 * v
        out = np.asarray(render_mask(mask, p, 64))
        assert out.shape == (64, 64)
        assert set(np.unique(out)) <= {0, 3, 6, 9, 255}
        assert (out == 255).any()  # rotation brings in the ignore fill
        # The image path shows the same geometry: its pixels, binned back to labels, mostly agree.
        img = np.asarray(render(as_rgb, p, 64))[..., 0].astype(int)
        valid = out != 255
        assert (np.abs(img[valid] - out[valid].astype(int) * 20) < 30).mean() > 0.95
        p[4] = 1 - p[4]  # the mirrored geometry does not fit
        mirrored = np.asarray(render_mask(mask, p, 64)).astype(int)
        assert (np.abs(img[valid] - mirrored[valid] * 20) < 30).mean() < 0.3


def test_spec_validation_and_loading(tmp_path):
    with pytest.raises(UserError, match="unknown field"):
        ViewSpec.from_dict({"scale": [0.5, 1.0], "sclae": 1})
    with pytest.raises(UserError, match="version"):
        ViewSpec.from_dict({"version": VIEW_FORMAT_VERSION + 1})
    with pytest.raises(UserError, match="randaug_ops"):
        ViewSpec(randaug_ops=MAX_OPS + 1)
    with pytest.raises(UserError, match="kind"):
        ViewSpec(kind="test")
    with pytest.raises(UserError, match="scale"):
        ViewSpec(scale=(0.0, 1.0))
    assert load_view_spec("light") == VIEW_PRESETS["light"]
    assert VIEW_PRESETS["light"].randaug_ops == 0 and VIEW_PRESETS["light"].scale == (0.35, 1.0)
    assert load_view_spec('{"kind": "eval", "crop_pct": 0.9}').crop_pct == 0.9
    (tmp_path / "v.yaml").write_text("scale: [0.2, 1.0]\nrandaug_ops: 1\n")
    assert load_view_spec(str(tmp_path / "v.yaml")) == ViewSpec(scale=(0.2, 1.0), randaug_ops=1)
    (tmp_path / "v.json").write_text(VIEW_PRESETS["eval"].to_json())
    assert load_view_spec(str(tmp_path / "v.json")) == VIEW_PRESETS["eval"]
    with pytest.raises(UserError, match="train, light, eval"):
        load_view_spec("heavy")
