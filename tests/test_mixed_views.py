"""Mixed views (MixUp, CutMix): parameters drawn like any view's, cached teacher outputs on the mixed image, the
student replaying the same mix; refusals where a mix cannot be replayed."""

import json

import numpy as np
import pytest
import torch

from kt.checkpoints import load_checkpoint
from kt.render import render_view, to_tensor
from kt.shards import iter_samples
from kt.student.cli import main
from kt.teacher_cache.build import BuildConfig, build_cache
from kt.teacher_cache.cli import main as cache_main
from kt.teacher_cache.reader import CacheReader
from kt.views import (MIX_DIM, PARAM_DIM, VIEW_PRESETS, ViewSpec, base_params, load_view_spec, mix_mode, partner_row,
                      sample_params, view_dim)

MIXED = {"scale": [0.35, 1.0], "color_jitter": 0.2, "randaug_ops": 0, "mix": "mixup+cutmix", "mix_prob": 0.8}


def test_specs_that_do_not_mix_keep_their_fields_and_views():
    """A spec that does not mix stores the fields (and so the fingerprint, which keys its views) it always had."""
    for spec in VIEW_PRESETS.values():
        assert not {"mix", "mix_prob", "mixup_alpha", "cutmix_alpha"} & set(spec.to_dict())
        assert view_dim(spec) == PARAM_DIM and sample_params(spec, 0, "k", 1).shape == (PARAM_DIM,)
    # the view draws are the first of a counter-based stream: mixing appends draws and moves none of the base ones
    light, mixed = VIEW_PRESETS["light"], load_view_spec(MIXED)
    assert light.fingerprint() != mixed.fingerprint()
    assert sample_params(mixed, 0, "k", 1).shape == (PARAM_DIM + MIX_DIM,)


def test_mix_parameters_are_a_pure_function_and_well_formed():
    spec = load_view_spec(MIXED)
    params = np.stack([sample_params(spec, 3, f"k{i}", v) for i in range(200) for v in range(2)])
    again = np.stack([sample_params(spec, 3, f"k{i}", v) for i in range(200) for v in range(2)])
    assert np.array_equal(params, again)
    modes = [mix_mode(p) for p in params]
    share = {m: modes.count(m) / len(modes) for m in ("none", "mixup", "cutmix")}
    assert 0.1 < share["none"] < 0.3 and 0.3 < share["mixup"] < 0.5 and 0.3 < share["cutmix"] < 0.5
    for p, m in zip(params, modes):
        lam = p[PARAM_DIM + 1]
        assert 0 <= lam <= 1
        if m == "cutmix":
            x0, y0, x1, y1 = p[PARAM_DIM + 3:]
            assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
            assert lam == pytest.approx(1 - (x1 - x0) * (y1 - y0), abs=1e-6)
        if m == "none":
            assert lam == 1 and partner_row(p, 5, 10) is None
        else:
            partners = {partner_row(p, 5, 10)}
            assert partners <= set(range(10)) - {5}
    # Beta(a, a) through its quantile: a < 1 pushes lam to the ends, a > 1 to the middle
    for alpha, lo, hi in ((0.2, 0.0, 0.35), (4.0, 0.55, 1.0)):
        s = load_view_spec({**MIXED, "mix": "mixup", "mix_prob": 1.0, "mixup_alpha": alpha})
        lam = np.array([sample_params(s, 0, f"k{i}", 0)[PARAM_DIM + 1] for i in range(400)])
        middle = np.mean(np.abs(lam - 0.5) < 0.25)
        assert lo <= middle <= hi, (alpha, middle)
    with pytest.raises(Exception, match="mix must be one of"):
        ViewSpec(mix="mixmax")
    with pytest.raises(Exception, match="kind train"):
        ViewSpec(kind="eval", mix="mixup")


def test_render_view_mixes_the_two_views_at_any_size():
    from PIL import Image

    spec = load_view_spec({**MIXED, "mix_prob": 1.0, "color_jitter": 0.0})  # plain colours: the mix is all there is
    a = Image.new("RGB", (28, 28), (200, 0, 0))
    b = Image.new("RGB", (28, 28), (0, 0, 200))
    for v in range(8):
        p = sample_params(spec, 0, "a", v)
        q = sample_params(spec, 0, "b", v)
        for size in (24, 48):
            x = np.asarray(render_view(a, p, size, b, q), dtype=np.float64)
            own = np.mean(x[..., 0] > 100)
            if mix_mode(p) == "mixup":  # every pixel is lam of a's red and 1 - lam of b's blue
                lam = p[PARAM_DIM + 1]
                assert np.allclose(x[..., 0], round(200 * lam), atol=1) and np.allclose(x[..., 2], round(200 * (1 - lam)), atol=1)
            else:  # the box shows b, the rest a: the share of a's pixels is lam, up to the box's pixel rounding
                assert own == pytest.approx(p[PARAM_DIM + 1], abs=4 / size + 0.02)
    with pytest.raises(ValueError, match="partner"):
        render_view(a, sample_params(spec, 0, "a", 0), 24)


@pytest.fixture(scope="module")
def teacher(fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["finetune", "--model", "test_efficientnet", "--data", str(fmnist["root"] / "train"),
                 "--labels-per-class", "5", "--epochs", "6", "--lr", "0.01", "--image-size", "32", "--batch-size", "10",
                 "--workers", "0", "--out", str(out)]) == 0
    return out / "checkpoint"


@pytest.fixture(scope="module")
def mixed_cache(fmnist, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "mixed.zarr"
    build_cache(BuildConfig(teacher=str(teacher), data=str(fmnist["root"] / "train"), out=str(out), views=2,
                            targets=["logits"], image_size=32, batch_size=50, workers=0, codec=["logits=fp16"],
                            view_spec=json.dumps(MIXED)))
    return out


def test_cached_targets_are_the_teachers_outputs_on_the_mixed_view_the_student_replays(fmnist, mixed_cache, teacher):
    from kt.student.dataset import CacheSource
    from kt.student.stream import ReplayStream, StreamSpec

    reader = CacheReader(str(mixed_cache))
    assert reader.view_set.spec.mixes
    urls = fmnist["train"]
    model = load_checkpoint(teacher).eval()
    spec = StreamSpec(tuple(urls), (100, 100, 100), 64, seed=0, workers=0)
    images = {s.key: s.image for s in iter_samples(urls)}
    shard_of = {k: u for u in urls for k in reader.shard(u, []).rows}
    seen, mixed_checked = set(), 0
    for epoch in (0, 1):  # both cached views of each sample
        stream = ReplayStream(spec, epoch, 0, CacheSource(reader, ["logits"]), reader.view_set, "cycle", 24,
                              model.mean, model.std)
        for batch in stream:
            for i, key in enumerate(batch["keys"]):
                shard = reader.shard(shard_of[key], ["logits"])
                row, v = shard.rows[key], int(batch["views"][i])
                p = shard.params[row, v]
                assert np.array_equal(batch["params"][i].numpy(), p)
                mode = mix_mode(p)
                seen.add(mode)
                mate = ()
                if mode != "none":  # the partner: another sample of the same input shard, showing its view v
                    partner = partner_row(p, row, len(shard.keys))
                    assert partner != row and 0 <= partner < len(shard.keys)
                    mate = (images[shard.keys[partner]], shard.params[partner, v])
                # the student's pixels: the stored mix at its own size
                x = to_tensor(render_view(images[key], p, 24, *mate), model.mean, model.std)
                assert torch.equal(batch["x"][i], x)
                if i % 8:
                    continue
                # the teacher's pixels: the same mix at the teacher's size reproduce the cached targets
                with torch.no_grad():
                    fresh = model(to_tensor(render_view(images[key], p, 32, *mate), model.mean, model.std)[None])
                cached, fresh = batch["targets"]["logits"][i].numpy(), fresh[0].numpy()
                tol = 1e-3 * np.abs(fresh).max()  # fp16's rounding, at the logits' scale
                assert np.abs(cached - fresh).max() <= tol
                if mode != "none" and p[PARAM_DIM + 1] <= 0.75:  # a real mix: the plain view's outputs differ
                    with torch.no_grad():
                        plain = model(to_tensor(render_view(images[key], base_params(p), 32), model.mean,
                                                model.std)[None])[0].numpy()
                    assert np.abs(plain - fresh).max() > 10 * tol
                    mixed_checked += 1
    assert seen == {"none", "mixup", "cutmix"} and mixed_checked >= 20


def test_a_mixed_cache_trains_and_verifies(fmnist, mixed_cache, teacher, tmp_path, capsys):
    assert main(["train", "--model", "test_vit", "--cache", str(mixed_cache), "--data", str(fmnist["root"] / "train"),
                 "--image-size", "16", "--batch-size", "32", "--epochs", "2", "--workers", "2",
                 "--out", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completed"]
    assert cache_main(["verify", str(mixed_cache), "--teacher", str(teacher), "--data", str(fmnist["root"] / "train"),
                       "--samples", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["samples_checked"] == 40


def test_mixed_views_refused_where_they_cannot_be_replayed(fmnist, mixed_cache, teacher, tmp_path, capsys):
    data = str(fmnist["root"] / "train")
    mixed = json.dumps(MIXED)
    # finetuning on labels takes plain views only
    assert main(["finetune", "--model", "test_efficientnet", "--data", data, "--labels-per-class", "2",
                 "--epochs", "1", "--image-size", "32", "--view", mixed, "--out", str(tmp_path / "f")]) == 2
    assert "mixed views" in capsys.readouterr().err
    # the GPU render path does not mix
    assert cache_main(["build", "--teacher", str(teacher), "--data", data, "--out", str(tmp_path / "c.zarr"),
                       "--view-spec", mixed, "--render", "cuda"]) == 2
    assert "mixed views" in capsys.readouterr().err
