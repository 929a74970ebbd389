"""Target codecs: round trips, the fidelity each codec promises, spec parsing, state, byte counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kt.errors import UserError
from kt.teacher_cache.codecs import DEFAULT_CODECS, Codec, PcaCodec, fidelity, parse_codec

ITEM_SHAPES = {"logits": (50,), "embedding": (32,), "patches": (4, 5, 24), "seg_logits": (6, 8, 10)}
ALL_SPECS = [
    ("logits", "fp16"),
    ("logits", "topk:k=5"),
    ("embedding", "fp16"),
    ("embedding", "int8"),
    ("embedding", "pca:d=8,int8"),
    ("embedding", "pca:d=8,fp16"),
    ("patches", "fp16"),
    ("patches", "int8"),
    ("patches", "pca:d=8,int8"),
    ("patches", "pca:d=8,fp16"),
    ("seg_logits", "fp16"),
    ("seg_logits", "pixel-topk:k=3"),
]


def _raw(target: str, lead=(12,), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=lead + ITEM_SHAPES[target]) * 2).astype(np.float32)


def _fitted(target: str, spec: str, sample: np.ndarray) -> Codec:
    codec = parse_codec(spec, target)
    codec.fit(sample)
    return codec


def _low_rank_patches(n, channels=96, rank=12, noise=0.01, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4, 4, rank)) * np.linspace(3, 0.5, rank)
    mix = rng.normal(size=(rank, channels)) / np.sqrt(rank)
    return (z @ mix + 0.5 + noise * rng.normal(size=(n, 4, 4, channels))).astype(np.float32)


def _peaked_logits(n, num_classes=1000, margin=12.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, num_classes))
    x[np.arange(n), rng.integers(0, num_classes, n)] += margin
    return x.astype(np.float32)


def _assert_fp16_log_close(q, p):
    """Kept probabilities are exact up to float16 rounding of log p (half an ulp: |log p| * 2**-11),
    plus the renormalisation that absorbs those roundings."""
    err = np.abs(np.log(q) - np.log(p))
    assert (err <= np.abs(np.log(p)) * 2.0**-11 + 5e-4).all(), err.max()


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.mark.parametrize("target,spec", ALL_SPECS)
@pytest.mark.parametrize("lead", [(12,), (6, 2)])
def test_round_trip_shapes_and_dtypes(target, spec, lead):
    x = _raw(target, lead)
    codec = _fitted(target, spec, x)
    parts = codec.encode(x)
    for name, (shape, dtype) in codec.part_specs(ITEM_SHAPES[target]).items():
        assert parts[name].shape == lead + shape, name
        assert parts[name].dtype == dtype, name
    assert set(parts) == set(codec.part_specs(ITEM_SHAPES[target]))
    decoded = codec.decode(parts)
    assert decoded.shape == x.shape and decoded.dtype == np.float32
    assert codec.bytes_per_item(ITEM_SHAPES[target]) * np.prod(lead) == sum(p.nbytes for p in parts.values())


@pytest.mark.parametrize("target", ["logits", "embedding", "patches", "seg_logits"])
def test_fp16_exact_to_fp16_rounding(target):
    x = _raw(target)
    codec = parse_codec("fp16", target)
    np.testing.assert_array_equal(codec.decode(codec.encode(x)), x.astype(np.float16).astype(np.float32))


def test_fp16_clips_to_range_instead_of_inf():
    codec = parse_codec("fp16", "embedding")
    decoded = codec.decode(codec.encode(np.array([[1e6, -1e6, 1.0]], np.float32)))
    assert np.isfinite(decoded).all()


def test_topk_keeps_top_probabilities_and_tail_mass():
    x = _raw("logits") * 3
    codec = parse_codec("topk:k=5", "logits")
    parts = codec.encode(x)
    q = np.exp(codec.decode(parts).astype(np.float64))
    p = _softmax(x.astype(np.float64))
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
    top = np.argsort(-p, -1)[:, :5]
    np.testing.assert_array_equal(parts["indices"], top)
    _assert_fp16_log_close(np.take_along_axis(q, top, -1), np.take_along_axis(p, top, -1))
    # the remaining mass is spread uniformly over the other classes
    rest = np.ones_like(p, bool)
    np.put_along_axis(rest, top, False, -1)
    tail = np.where(rest, p, 0).sum(-1)
    _assert_fp16_log_close(q[rest].reshape(len(x), -1), np.repeat(tail[:, None] / 45, 45, axis=1))
    # softmax of the decoded array is the decoded distribution, also after a temperature
    np.testing.assert_allclose(_softmax(codec.decode(parts).astype(np.float64)), q, rtol=1e-5)


def test_topk_small_kl_for_peaked_logits_and_byte_goal():
    x = _peaked_logits(200)
    codec = parse_codec("topk:k=10", "logits")
    fid = fidelity("logits", x, codec.decode(codec.encode(x)))
    assert fid["kl_mean"] < 0.01 and fid["kl_max"] < 0.1
    assert fid["top1_agreement"] == 1.0
    assert codec.bytes_per_item((1000,)) == 42  # goal: <= 50 bytes per view for 1000 classes


def test_topk_all_classes_is_nearly_lossless_and_tied_values_keep_top1():
    x = _raw("logits") * 3
    codec = parse_codec("topk:k=50", "logits")
    fid = fidelity("logits", x, codec.decode(codec.encode(x)))
    assert fid["kl_max"] < 1e-5 and fid["top1_agreement"] == 1.0
    tied = np.array([[5.0, 5.0001, -3.0, -4.0]], np.float32)  # equal in float16
    codec = parse_codec("topk:k=2", "logits")
    assert codec.decode(codec.encode(tied)).argmax() == 1


def test_topk_extreme_logits_stay_finite():
    x = np.array([[1000.0, -1000.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]], np.float32)
    codec = parse_codec("topk:k=1", "logits")
    decoded = codec.decode(codec.encode(x))
    assert np.isfinite(decoded).all()
    fid = fidelity("logits", x, decoded)
    assert fid["kl_max"] < 1e-3 and fid["top1_agreement"] == 1.0


def test_pixel_topk_per_pixel_distribution():
    x = _raw("seg_logits") * 3
    codec = parse_codec("pixel-topk:k=3", "seg_logits")
    parts = codec.encode(x)
    q = np.exp(codec.decode(parts).astype(np.float64))
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
    p = _softmax(x.astype(np.float64), axis=1)
    top = np.argsort(-p, 1)[:, :3]
    np.testing.assert_array_equal(parts["indices"], top)
    _assert_fp16_log_close(np.take_along_axis(q, top, 1), np.take_along_axis(p, top, 1))
    assert fidelity("seg_logits", x, np.log(q))["top1_agreement"] == 1.0


@pytest.mark.parametrize("target", ["embedding", "patches"])
def test_int8_cosine(target):
    x = _raw(target, (64,))
    codec = parse_codec("int8", target)
    fid = fidelity(target, x, codec.decode(codec.encode(x)))
    assert fid["cosine_min"] >= 0.999


def test_int8_zero_vector_decodes_to_zero():
    codec = parse_codec("int8", "embedding")
    x = np.zeros((2, 16), np.float32)
    np.testing.assert_array_equal(codec.decode(codec.encode(x)), x)


@pytest.mark.parametrize("spec", ["int8", "pca:d=8,int8"])
@pytest.mark.parametrize("magnitude", [1e-3, 1e-5, 1e-7, 1e-12])
def test_int8_tiny_vectors_keep_their_direction(spec, magnitude):
    """A float16 scale underflows below ~6e-8 (vectors under ~1e-5 decoded to zero, and lost precision
    from ~1e-2 down): the scale must cover the range of float32 features."""
    codec = parse_codec(spec, "embedding")
    x = _raw("embedding", (64,))
    if spec.startswith("pca"):
        codec.fit(x)
        codec.mean[:] = 0  # tiny vectors in the basis's span: only the coefficients' quantizer is tested
        x = (x - x.mean(0)) @ codec.basis @ codec.basis.T
    x = (x * magnitude).astype(np.float32)
    decoded = codec.decode(codec.encode(x))
    assert fidelity("embedding", x, decoded)["cosine_min"] >= 0.999
    np.testing.assert_allclose(decoded, x, rtol=0, atol=float(np.abs(x).max()) / 100)


@pytest.mark.parametrize("quant", ["int8", "fp16"])
def test_pca_low_rank_patches_nearly_exact(quant):
    x = _low_rank_patches(40)
    codec = _fitted("patches", f"pca:d=16,{quant}", x[:20])  # rank 12 <= d: held-out tokens survive
    fid = fidelity("patches", x[20:], codec.decode(codec.encode(x[20:])))
    assert fid["cosine_mean"] >= 0.999 and fid["cosine_min"] >= 0.995
    assert codec.explained > 0.99


def test_pca_int8_patch_size_and_fidelity_goal():
    # 384 channels (ViT-S/14 patch tokens), rank-32 signal + noise: >= 8x below fp16, cosine >= 0.98
    x = _low_rank_patches(24, channels=384, rank=32, noise=0.05)
    codec = _fitted("patches", DEFAULT_CODECS["patches"], x[:12])
    item = (16, 16, 384)
    assert parse_codec("fp16", "patches").bytes_per_item(item) / codec.bytes_per_item(item) >= 8
    assert fidelity("patches", x[12:], codec.decode(codec.encode(x[12:])))["cosine_mean"] >= 0.98


def test_pca_refuses_bad_fits_and_unfitted_use():
    with pytest.raises(UserError, match="exceeds"):
        parse_codec("pca:d=64", "embedding").fit(_raw("embedding"))  # 32 channels
    with pytest.raises(UserError, match="needs >= 16"):
        parse_codec("pca:d=16", "embedding").fit(_raw("embedding", (4,)))
    with pytest.raises(RuntimeError, match="before fit"):
        parse_codec("pca:d=4", "embedding").encode(_raw("embedding"))


@pytest.mark.parametrize("target,spec", ALL_SPECS)
def test_state_round_trip_decodes_identically(target, spec):
    x = _raw(target)
    codec = _fitted(target, spec, x)
    parts = codec.encode(x)
    attrs, arrays = codec.state()
    attrs = json.loads(json.dumps(attrs))  # attributes must survive JSON
    restored = Codec.from_state(attrs, arrays)
    assert type(restored) is type(codec) and restored.spec == codec.spec
    np.testing.assert_array_equal(restored.decode(parts), codec.decode(parts))
    for name, part in restored.encode(x).items():
        np.testing.assert_array_equal(part, parts[name])


def test_pca_state_arrays():
    codec = _fitted("patches", "pca:d=8", _low_rank_patches(4))
    attrs, arrays = codec.state()
    assert arrays["mean"].shape == (96,) and arrays["basis"].shape == (96, 8)
    assert attrs["spec"] == "pca:d=8,int8" and attrs["item_shape"] == [4, 4, 96]
    assert isinstance(PcaCodec.from_state(attrs, arrays), PcaCodec)


@pytest.mark.parametrize(
    "spec,target,canonical",
    [
        ("topk:k=10", "logits", "topk:k=10"),
        (" topk : k = 7 ", "logits", "topk:k=7"),
        ("pca:d=64", "patches", "pca:d=64,int8"),
        ("pca:fp16,d=32", "embedding", "pca:d=32,fp16"),
        ("int8", "patches", "int8"),
        ("pixel-topk:k=3", "seg_logits", "pixel-topk:k=3"),
    ],
)
def test_parse_canonical_spec(spec, target, canonical):
    assert parse_codec(spec, target).spec == canonical


@pytest.mark.parametrize(
    "spec,target,message",
    [
        ("topk:k=10", "embedding", "valid: fp16, int8, pca:d=D"),
        ("int8", "logits", "valid: fp16, topk:k=K"),
        ("zstd", "patches", "unknown codec"),
        ("topk", "logits", "positive integer k"),
        ("topk:k=0", "logits", "positive integer k"),
        ("topk:k=ten", "logits", "positive integer k"),
        ("topk:k=3,j=2", "logits", "invalid codec arguments"),
        ("pca:d=8,int4", "patches", "invalid codec arguments"),
        ("pca:d=8,int8,fp16", "patches", "invalid codec arguments"),
        ("fp16:x=1", "embedding", "takes no arguments"),
        ("fp16", "depth", "valid targets: logits, embedding, patches, seg_logits"),
    ],
)
def test_parse_errors_are_user_errors(spec, target, message):
    with pytest.raises(UserError, match=message):
        parse_codec(spec, target)


def test_topk_k_larger_than_classes_is_user_error():
    codec = parse_codec("topk:k=20", "logits")
    with pytest.raises(UserError, match="exceeds"):
        codec.bytes_per_item((10,))


def test_defaults_parse_and_bytes_per_item():
    codecs = {t: parse_codec(s, t) for t, s in DEFAULT_CODECS.items()}
    assert codecs["logits"].bytes_per_item((1000,)) == 10 * 2 + 10 * 2 + 2  # values, uint16 indices, tail
    assert codecs["logits"].bytes_per_item((10,)) == 10 * 2 + 10 * 1 + 2  # uint8 indices
    assert codecs["embedding"].bytes_per_item((1024,)) == 2048
    # auto before its fit: the int8 fallback, the most it can cost (what `kt-cache plan` predicts)
    assert codecs["patches"].bytes_per_item((16, 16, 384)) == 256 * (384 + 4)  # int8 values, float32 scale
    assert codecs["seg_logits"].bytes_per_item((21, 64, 64)) == 64 * 64 * (5 * 2 + 5 * 1 + 2)  # 17 bytes a cell
    assert parse_codec("int8", "patches").bytes_per_item((16, 16, 384)) == 256 * (384 + 4)


def test_fidelity_reports():
    x = _raw("embedding")
    assert fidelity("embedding", x, x)["cosine_min"] == pytest.approx(1.0)
    assert fidelity("embedding", x, -x)["cosine_mean"] == pytest.approx(-1.0)
    logits = _raw("logits")
    fid = fidelity("logits", logits, logits + 3.0)  # a per-row shift is the same distribution
    assert fid["kl_max"] == pytest.approx(0.0, abs=1e-9) and fid["top1_agreement"] == 1.0
    with pytest.raises(ValueError):
        fidelity("logits", logits, logits[:2])


def test_auto_picks_the_smallest_pca_that_keeps_the_threshold_on_held_out_views():
    x = _low_rank_patches(40)  # rank 12 in 96 channels: d=8 loses a third of the signal, d=16 keeps it
    codec = _fitted("patches", "auto", x)
    chosen = codec.chosen
    assert chosen.spec == "pca:d=16,int8"
    sel = chosen.selection
    assert sel["requested"] == "auto:cos=0.98" and sel["held_out_items"] == 10 and sel["fit_items"] == 30
    assert [t["codec"] for t in sel["tried"]] == ["pca:d=8,int8", "pca:d=16,int8"]
    assert sel["tried"][0]["cosine_mean"] < 0.98 <= sel["fidelity"]["cosine_mean"]
    # the recorded fidelity is the stored codec's own on the held-out views (fitted without them)
    held = x[30:]
    fid = fidelity("patches", held, chosen.decode(chosen.encode(held)))
    assert fid["cosine_mean"] == pytest.approx(sel["fidelity"]["cosine_mean"], abs=1e-6)
    # the same as fitting pca:d=16 on the fit views directly
    direct = _fitted("patches", "pca:d=16,int8", x[:30])
    assert np.allclose(direct.basis, chosen.basis, atol=1e-6) and np.allclose(direct.mean, chosen.mean)
    # stored and reloaded: the concrete codec with its selection, decoding identically
    attrs, arrays = codec.state()
    again = Codec.from_state(json.loads(json.dumps(attrs)), arrays)
    assert again.spec == "pca:d=16,int8" and again.selection == sel
    parts = codec.encode(x)
    assert np.array_equal(again.decode(parts), codec.decode(parts))


def test_auto_falls_back_to_int8_and_a_stricter_threshold_costs_more():
    noise = _raw("patches", (40,))  # full-rank noise: no PCA below 24 channels keeps 0.98
    codec = _fitted("patches", "auto:cos=0.98", noise)
    assert codec.chosen.spec == "int8" and codec.chosen.selection["fidelity"]["cosine_mean"] > 0.99
    x = _low_rank_patches(40, noise=0.05)
    loose, strict = _fitted("patches", "auto:cos=0.9", x).chosen, _fitted("patches", "auto:cos=0.9999", x).chosen
    assert loose.bytes_per_item((4, 4, 96)) < strict.bytes_per_item((4, 4, 96))
    for bad in ("auto:cos=0", "auto:cos=1.5", "auto:cos=x", "auto:d=4", "auto:int8"):
        with pytest.raises(UserError):
            parse_codec(bad, "patches")
    with pytest.raises(RuntimeError, match="before fit"):
        parse_codec("auto", "embedding").encode(_raw("embedding"))
