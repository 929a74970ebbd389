"""The cache reader: cached targets == a fresh teacher forward on the replayed view, and its refusals.

Equivalence bounds (decoded cache vs teacher output on `render(image, stored params)`):
- fp16: |decoded - raw| <= 2^-11 |raw| (fp16 rounding) + 1e-5 (batch-layout numerics).
- topk:k=K logits: the top-1 class is the same; the K kept log-probabilities equal log_softmax(raw) within
  fp16 rounding (abs 2e-3 for values of a few nats); the decoded distribution sums to 1.
- int8 features: |decoded - raw| <= max|raw| / 254 * (1 + 2^-10) per vector (half a quantisation step,
  with the float32 scale) + 1e-5.
- pca:d=D,int8: decoded == the stored basis applied to the raw output (decode(encode(raw))) within half an
  int8 step of the coefficients mapped back, so cosine(decoded, decode(encode(raw))) >= 0.999; and the error
  to raw is at most the projection residual plus that quantisation error.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

from kt.errors import UserError
from kt.checkpoints import load_checkpoint, model_fingerprint, save_checkpoint
from kt.models import create_model
from kt.shards import iter_samples
from kt.views import ViewReplayError, load_view_spec, render, to_tensor
from kt.teacher_cache.cli import main
from kt.teacher_cache.reader import CacheReader, MissingKeyError
from kt.teacher_cache.store import shard_id_for

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A 10-class test_vit checkpoint at 32 px: 2x2x64 patch grid, 64-d embedding."""
    torch.manual_seed(0)
    model = create_model("test_vit", num_classes=10, image_size=32)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("teacher") / "checkpoint", classes=CLASSES))


def build_args(teacher: str, data, out, *extra: str, views: int = 2) -> list[str]:
    data = "::".join(data) if isinstance(data, (list, tuple)) else str(data)
    return ["build", "--teacher", teacher, "--data", data, "--out", str(out), "--views", str(views),
            "--seed", "0", "--targets", "logits,embedding,patches", "--batch-size", "16", "--workers", "0",
            "--fit-views", "64", *extra]


def teacher_forward(checkpoint: str, url: str, keys: list[str], params: np.ndarray) -> dict[str, np.ndarray]:
    """Raw teacher outputs on the replayed views: params (n, V, P) for `keys` of shard `url` -> (n, V, ...)."""
    from kt.teacher_cache.build import teacher_outputs

    model = load_checkpoint(checkpoint)
    images = {s.key: s.image for s in iter_samples([url])}
    n, v = params.shape[:2]
    x = torch.stack([to_tensor(render(images[k], params[i, j], model.image_size), model.mean, model.std)
                     for i, k in enumerate(keys) for j in range(v)])
    with torch.inference_mode():
        out = teacher_outputs(model, x, ["logits", "embedding", "patches"])
    return {t: a.reshape(n, v, *a.shape[1:]) for t, a in out.items()}


@pytest.fixture(scope="module")
def fp16_cache(tiny_teacher, fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "cache.zarr"
    codecs = "logits=fp16,embedding=fp16,patches=fp16"
    assert main(build_args(tiny_teacher, fmnist["train"][:2], out, "--codec", codecs)) == 0
    return str(out)


@pytest.fixture(scope="module")
def lossy_cache(tiny_teacher, fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("lossy") / "cache.zarr"
    assert main(build_args(tiny_teacher, fmnist["train"][:1], out,
                           "--codec", "logits=topk:k=3", "--codec", "embedding=int8,patches=pca:d=16,int8")) == 0
    return str(out)


# ------------------------------------------------------------------------------------------ equivalence
def test_fp16_cache_equals_fresh_teacher_forward(fp16_cache, tiny_teacher, fmnist):
    url = fmnist["train"][1]
    reader = CacheReader(fp16_cache)
    shard = reader.shard(url)
    rows = np.arange(0, len(shard), 7)
    raw = teacher_forward(tiny_teacher, url, [shard.keys[r] for r in rows], shard.params[rows])
    for t in ("logits", "embedding", "patches"):
        decoded = shard.targets[t][rows]
        assert decoded.dtype == np.float32 and decoded.shape == raw[t].shape
        np.testing.assert_allclose(decoded, raw[t], rtol=2.0 ** -11, atol=1e-5, err_msg=t)


def test_lossy_codecs_within_their_bounds(lossy_cache, tiny_teacher, fmnist):
    url = fmnist["train"][0]
    reader = CacheReader(lossy_cache)
    shard = reader.shard(url)
    rows = np.arange(0, len(shard), 5)
    raw = teacher_forward(tiny_teacher, url, [shard.keys[r] for r in rows], shard.params[rows])

    logits, logp_raw = shard.targets["logits"][rows], torch.log_softmax(torch.from_numpy(raw["logits"]), -1).numpy()
    assert (logits.argmax(-1) == raw["logits"].argmax(-1)).all()
    np.testing.assert_allclose(np.exp(logits).sum(-1), 1.0, atol=1e-5)
    top = np.argsort(-logp_raw, -1)[..., :3]
    np.testing.assert_allclose(np.take_along_axis(logits, top, -1), np.take_along_axis(logp_raw, top, -1), atol=2e-3)

    emb, raw_emb = shard.targets["embedding"][rows], raw["embedding"]
    step = np.abs(raw_emb).max(-1, keepdims=True) / 254 * (1 + 2.0 ** -10)
    assert (np.abs(emb - raw_emb) <= step + 1e-5).all()

    pca = reader.codecs["patches"]
    patches, raw_p = shard.targets["patches"][rows], raw["patches"]
    again = pca.decode(pca.encode(raw_p))
    cos = (patches * again).sum(-1) / np.linalg.norm(patches, axis=-1) / np.linalg.norm(again, axis=-1)
    assert cos.min() >= 0.999
    coeffs = (raw_p - pca.mean) @ pca.basis
    residual = np.linalg.norm(raw_p - (coeffs @ pca.basis.T + pca.mean), axis=-1)
    quant = np.sqrt(pca.d) * np.abs(coeffs).max(-1) / 254 * (1 + 2.0 ** -10)
    assert (np.linalg.norm(patches - raw_p, axis=-1) <= residual + quant + 1e-4).all()


# ------------------------------------------------------------------------------------------ the reader
def test_reader_api(fp16_cache, tiny_teacher, fmnist):
    urls = fmnist["train"][:2]
    reader = CacheReader(fp16_cache, targets=["logits"])
    assert reader.views_per_image == 2 and reader.seed == 0 and reader.num_classes == 10
    assert reader.classes == CLASSES and reader.view_spec == load_view_spec("light")  # the build default
    reader.require_complete(urls)
    shard = reader.shard(urls[1])
    assert list(shard.targets) == ["logits"] and shard.params.shape == (100, 2, shard.params.shape[2])
    assert shard.targets["logits"].shape == (100, 2, 10)
    wanted = [shard.keys[9], shard.keys[2], shard.keys[50]]
    rows = shard.align(wanted)
    assert rows.tolist() == [9, 2, 50]
    np.testing.assert_array_equal(shard.get("logits", rows), shard.targets["logits"][rows])
    np.testing.assert_array_equal(shard.get("logits", rows, view=1), shard.targets["logits"][rows, 1])
    assert reader.lookup(shard.keys[50]) == (shard_id_for(urls[1]), 50)
    one = reader.targets_for(shard.keys[50], 1)
    np.testing.assert_array_equal(one["logits"], shard.targets["logits"][50, 1])
    np.testing.assert_array_equal(reader.params_for(shard.keys[50], 1), shard.params[50, 1])
    with pytest.raises(UserError, match=r"lacks 2 of 3 sample keys \(nope, gone\)"):
        shard.align([shard.keys[0], "nope", "gone"])
    with pytest.raises(MissingKeyError, match="no sample 'nope'"):
        reader.lookup("nope")


def test_reader_expect_accepts_the_right_teacher_and_view(fp16_cache, tiny_teacher):
    model = load_checkpoint(tiny_teacher)
    CacheReader(fp16_cache, expect={"teacher": model_fingerprint(model), "classes": CLASSES,
                                    "view": {"spec": load_view_spec("light"), "seed": 0, "views_per_image": 2},
                                    "targets": ["logits", "patches"]})


@pytest.mark.parametrize("expect, field", [
    ({"teacher": {"weights_sha256": "00" * 32}}, "teacher.weights_sha256"),
    ({"teacher": {"arch": "fastvit_s12"}}, "teacher.arch"),
    ({"classes": ["a", "b"]}, "teacher.classes"),
    ({"view": {"spec": {"kind": "eval"}}}, "view.spec.kind"),
    ({"view": {"seed": 1}}, "view.seed"),
    ({"view": {"views_per_image": 4}}, "view.views_per_image"),
])
def test_reader_refuses_a_mismatch_in_one_line(fp16_cache, expect, field):
    with pytest.raises(UserError) as e:
        CacheReader(fp16_cache, expect=expect)
    msg = str(e.value)
    assert field in msg and "cache has" in msg and "expected" in msg and "\n" not in msg


def test_reader_refuses_unknown_target_and_non_cache(fp16_cache, tmp_path):
    with pytest.raises(UserError, match="no target 'seg_logits'; it holds: logits, embedding, patches"):
        CacheReader(fp16_cache, targets=["seg_logits"])
    with pytest.raises(UserError, match="no kt cache"):
        CacheReader(str(tmp_path / "nothing.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(UserError, match="not a kt cache"):
        CacheReader(str(tmp_path / "plain.zarr"))


def test_incomplete_store_is_refused(tiny_teacher, fmnist, tmp_path):
    import shutil

    src = tmp_path / "copy.zarr"
    out = tmp_path / "cache.zarr"
    assert main(build_args(tiny_teacher, fmnist["train"][:2], out, "--codec", "patches=fp16", views=1)) == 0
    shutil.copytree(out, src)
    (out / "complete" / shard_id_for(fmnist['train'][1]) / "zarr.json").unlink()  # as a killed build leaves it
    reader = CacheReader(str(out))
    with pytest.raises(UserError) as e:
        reader.require_complete(fmnist["train"][:2] + ["/x/train-000009.tar"])
    assert str(e.value).count("\n") == 0
    assert "2 of 3 input shards not built (train-000001, train-000009)" in str(e.value)
    with pytest.raises(UserError, match="train-000001 is not complete"):
        reader.shard(fmnist["train"][1])
    reader.shard(fmnist["train"][0])  # the complete one still reads
    CacheReader(str(src)).require_complete(fmnist["train"][:2])


def test_changed_view_parameters_fail_loudly(tiny_teacher, fmnist, tmp_path):
    out = tmp_path / "cache.zarr"
    assert main(build_args(tiny_teacher, fmnist["train"][:1], out, "--codec", "patches=fp16", views=1)) == 0
    sid = shard_id_for(fmnist["train"][0])
    params = zarr.open_group(str(out), mode="r+")[f"shards/{sid}/params"]
    params[3, 0, 0] = params[3, 0, 0] + 0.05  # what an RNG change would look like at read time
    with pytest.raises(ViewReplayError, match="crop_x0"):
        CacheReader(str(out)).shard(sid)
    assert len(CacheReader(str(out)).shard(sid, check_views=False)) == 100


def test_marker_records_keys_in_attrs(fp16_cache, fmnist):
    attrs = CacheReader(fp16_cache).attrs
    assert attrs["input_shards"] == {shard_id_for(u): u for u in fmnist["train"][:2]}
    assert json.loads(json.dumps(attrs["build_config"]))["views"] == 2
    assert os.path.isdir(os.path.join(fp16_cache, "complete"))
