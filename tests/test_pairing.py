"""A cached target belongs to one sample's bytes: content digests, unique keys, finite teacher outputs.

Each test here failed before content digests existed: a cache built on one shard accepted another shard of
the same name and keys with other images; duplicate keys were resolved by "last one wins"; NaN teacher
outputs were cached as they were.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
import pytest
import zarr
from PIL import Image

from kt.errors import UserError
from kt.shards import iter_samples, write_shards
from kt.teacher_cache import build
from kt.teacher_cache.cli import main as cache_main
from kt.teacher_cache.reader import CacheReader
from kt.teacher_cache.store import CacheStore, shard_id_for
from kt.views import ViewSet
from tests.test_reader import build_args, tiny_teacher  # noqa: F401 -- the fixture

CHANGED = "s-00005"  # the one sample whose pixels differ between transfer sets A and B


def _images(n: int) -> list[np.ndarray]:
    from tools.make_shards import load_fashion_mnist

    return [a for a in load_fashion_mnist("test")[0][:n]]


@pytest.fixture(scope="module")
def twin_sets(tmp_path_factory):
    """A/train-000000.tar and B/train-000000.tar: same shard name, same keys, one image differs."""
    root = tmp_path_factory.mktemp("twins")
    images = _images(12)
    a = write_shards(((f"s-{i:05d}", Image.fromarray(x), 0) for i, x in enumerate(images)), root / "A",
                     prefix="train", maxcount=100)
    changed = [255 - x if f"s-{i:05d}" == CHANGED else x for i, x in enumerate(images)]
    b = write_shards(((f"s-{i:05d}", Image.fromarray(x), 0) for i, x in enumerate(changed)), root / "B",
                     prefix="train", maxcount=100)
    return a, b


@pytest.fixture(scope="module")
def twin_cache(tiny_teacher, twin_sets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("twin-cache") / "cache.zarr"
    assert cache_main(build_args(tiny_teacher, twin_sets[0], out, "--codec", "patches=fp16", views=1)) == 0
    return out


def one_line(capsys, main, argv, prog) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "\r" not in line and line.strip()]  # minus progress bars
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------- content digests
def test_cache_stores_the_digest_of_each_image(twin_cache, twin_sets):
    from kt.shards import content_digest

    shard = CacheReader(str(twin_cache)).shard(twin_sets[0][0], [])
    raw = {s.key: s.raw["png"] for s in iter_samples(twin_sets[0], decode=False, keep_raw=True)}
    assert [int(d) for d in shard.digests] == [content_digest(raw[k]) for k in shard.keys]


def test_student_refuses_other_pixels_under_the_same_keys(twin_cache, twin_sets, tmp_path, capsys):
    from kt.student.cli import main as student_main

    argv = ["train", "--model", "test_vit", "--cache", str(twin_cache), "--data", twin_sets[1][0],
            "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "r")]
    err = one_line(capsys, student_main, argv, "kt-student")
    assert CHANGED in err and twin_sets[1][0] in err and "content digest" in err


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_checks_content_as_it_reads(twin_cache, twin_sets, workers):
    """The stream's own check (the data may change after the up-front one), also from a DataLoader worker."""
    from kt.errors import user_message
    from kt.student.dataset import CacheSource
    from kt.student.stream import ReplayStream, StreamSpec, stream_loader

    reader = CacheReader(str(twin_cache))
    spec = StreamSpec((twin_sets[1][0],), (12,), 4, seed=0, workers=workers)
    stream = ReplayStream(spec, 0, 0, CacheSource(reader, ["logits"]), ViewSet(reader.view_spec, reader.seed, 1), "cycle",
                          32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(UserError) as caught:
        list(stream_loader(stream))
    message = user_message(caught.value)
    assert "\n" not in message and CHANGED in message and "content digest" in message
    # the transfer set the cache was built from passes
    good = StreamSpec((twin_sets[0][0],), (12,), 4, seed=0, workers=workers)
    assert len(list(stream_loader(ReplayStream(good, 0, 0, CacheSource(reader, ["logits"]), ViewSet(reader.view_spec,
                                               reader.seed, 1), "cycle", 32, (0.5,) * 3, (0.5,) * 3)))) == 3


def test_verify_refuses_other_pixels(twin_cache, twin_sets, capsys):
    assert cache_main(["verify", str(twin_cache), "--samples", "12", "--data", twin_sets[0][0]]) == 0
    capsys.readouterr()
    err = one_line(capsys, cache_main, ["verify", str(twin_cache), "--samples", "12", "--data", twin_sets[1][0]],
                   "kt-cache")
    assert CHANGED in err and "train-000000" in err


def test_format_1_cache_reads_with_a_warning_and_is_not_resumed(tiny_teacher, twin_sets, tmp_path, capsys):  # noqa: F811
    """A cache built before digests: readable (content unchecked, one warning line); a build refuses to
    resume it, since its new shards would be checked and its old ones not."""
    out = tmp_path / "old.zarr"
    args = build_args(tiny_teacher, twin_sets[0], out, "--codec", "patches=fp16", views=1)
    assert cache_main(args) == 0
    # make it what format 1 wrote: no digests array, none in the marker, the marker a plain object, format 1
    group = zarr.open_group(str(out), mode="r+")
    sid = shard_id_for(twin_sets[0][0])
    del group[f"shards/{sid}/digests"]
    marker = json.loads((out / "complete" / sid / "zarr.json").read_text())["attributes"]
    del marker["checksums"]["digests"]
    shutil.rmtree(out / "complete")
    (out / "complete").mkdir()
    (out / "complete" / f"{sid}.json").write_text(json.dumps(marker))
    group.attrs["kt_cache_format"] = 1
    capsys.readouterr()

    reader = CacheReader(str(out))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "format 1" in err and "by key only" in err
    shard = reader.shard(twin_sets[1][0], ["logits"])
    assert shard.digests is None and len(shard) == 12
    shard.check_content(CHANGED, 0, twin_sets[1][0])  # nothing to check against: accepted
    assert cache_main(["verify", str(out), "--samples", "0"]) == 0
    capsys.readouterr()
    err = one_line(capsys, cache_main, args, "kt-cache")
    assert "format-1" in err and "--overwrite" in err
    assert cache_main(args + ["--overwrite", "true"]) == 0
    assert CacheReader(str(out)).shard(twin_sets[0][0], []).digests is not None


# -------------------------------------------------------------------------------------- duplicate keys
def _png(value: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("keys", [["a", "b", "a"], ["a", "a", "b"]], ids=["apart", "adjacent"])
def test_build_refuses_a_key_twice_in_a_shard(tiny_teacher, tmp_path, capsys, keys):  # noqa: F811
    samples = [{"__key__": k, "png": _png(10 * i), "cls": b"0"} for i, k in enumerate(keys)]
    url = write_shards(samples, tmp_path / "dup", prefix="dup", maxcount=10)[0]
    err = one_line(capsys, cache_main, build_args(tiny_teacher, url, tmp_path / "c.zarr", views=1), "kt-cache")
    assert "duplicate sample key 'a'" in err and url in err


def test_build_refuses_a_key_in_two_shards(tiny_teacher, tmp_path, capsys):  # noqa: F811
    first = write_shards([{"__key__": k, "png": _png(i), "cls": b"0"} for i, k in enumerate("abc")],
                         tmp_path / "one", prefix="one", maxcount=10)[0]
    second = write_shards([{"__key__": k, "png": _png(50 + i), "cls": b"0"} for i, k in enumerate("dbe")],
                          tmp_path / "two", prefix="two", maxcount=10)[0]
    err = one_line(capsys, cache_main, build_args(tiny_teacher, [first, second], tmp_path / "c.zarr", "--codec",
                                                  "patches=fp16", views=1),
                   "kt-cache")
    assert "duplicate sample key 'b'" in err and first in err and second in err


def test_imagefolder_maker_never_merges_or_collides(tmp_path):
    from tools.make_shards import make_imagefolder

    tree = tmp_path / "tree"
    (tree / "cat").mkdir(parents=True)
    (tree / "dog").mkdir()
    names = {"cat": ["a b.png", "a_b.png", "x.jpg", "x.png", "y.png"], "dog": ["a b.png"]}
    for cls, files in names.items():
        for i, name in enumerate(files):
            Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tree / cls / name,
                                                                       format="PNG" if name.endswith("png") else "JPEG")
    urls = make_imagefolder(tree, tmp_path / "out", shard_size=100)
    samples = list(iter_samples(urls, decode=False, keep_raw=True))
    keys = [s.key for s in samples]
    assert len(samples) == 6 and len(set(keys)) == 6  # every file is its own sample
    assert all(sum(ext in s.raw for ext in ("png", "jpg")) == 1 for s in samples)
    assert sorted(s.label for s in samples) == [0, 0, 0, 0, 0, 1]
    assert "cat/y" in keys  # names without collisions keep the readable key


# ---------------------------------------------------------------------------------- non-finite outputs
@pytest.fixture
def with_black_images(tmp_path):
    """12 images, two of them black: the patched teacher below answers NaN (or inf) on constant inputs."""
    images = _images(12)
    images[3] = np.zeros_like(images[3])
    images[8] = np.zeros_like(images[8])
    return write_shards(((f"s-{i:05d}", Image.fromarray(x), 0) for i, x in enumerate(images)), tmp_path / "nan",
                        prefix="nan", maxcount=100)


def test_non_finite_teacher_outputs_are_bad_samples(tiny_teacher, with_black_images, tmp_path, capsys,  # noqa: F811
                                                    monkeypatch):
    real = build.launch_teacher  # every teacher forward of the build goes through it

    def nan_on_constant_images(model, x, targets, *placement):
        out = real(model, x, targets, *placement).result()
        constant = (x.flatten(2).std(2).amax(1) == 0).numpy()
        if "embedding" in out:
            out["embedding"][constant, 0] = np.nan
        if "logits" in out:
            out["logits"][constant, 1] = np.inf
        return build.TeacherRun({t: torch.from_numpy(v) for t, v in out.items()}, None)

    monkeypatch.setattr(build, "launch_teacher", nan_on_constant_images)
    args = build_args(tiny_teacher, with_black_images, tmp_path / "c.zarr", "--codec", "patches=int8",
                      "--view-spec", "eval", views=2)
    err = one_line(capsys, cache_main, args, "kt-cache")
    assert "2 of 12 samples are bad" in err and "non-finite teacher output" in err
    ok = [str(tmp_path / "ok.zarr") if a == str(tmp_path / "c.zarr") else a for a in args]
    assert cache_main(ok + ["--max-bad-fraction", "0.2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 10 and summary["bad"] == 2
    marker = CacheStore.open(str(tmp_path / "ok.zarr")).completed()[shard_id_for(with_black_images[0])]
    reasons = {b["key"]: b["reason"] for b in marker["bad"]}
    assert reasons == {"s-00003": "non-finite teacher output (embedding, logits)",
                       "s-00008": "non-finite teacher output (embedding, logits)"}
    shard = CacheReader(str(tmp_path / "ok.zarr")).shard(with_black_images[0])
    assert "s-00003" not in shard.keys and len(shard) == 10 and len(shard.digests) == 10
    for name in ("logits", "embedding", "patches"):
        assert np.isfinite(shard.targets[name]).all()
    # rows stay aligned with their keys after the bad ones are dropped: digests and view params match
    from kt.shards import content_digest
    from kt.views import sample_params

    raw = {s.key: s.raw["png"] for s in iter_samples(with_black_images, decode=False, keep_raw=True)}
    assert [int(d) for d in shard.digests] == [content_digest(raw[k]) for k in shard.keys]
    view_spec = CacheReader(str(tmp_path / "ok.zarr")).view_spec
    assert all(np.array_equal(shard.params[i, 1], sample_params(view_spec, 0, k, 1)) for i, k in enumerate(shard.keys))


def test_imagefolder_maker_shuffles_by_seed(tmp_path):
    from tools.make_shards import main as make_main

    tree = tmp_path / "tree"
    for c in range(3):
        (tree / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((4, 4), c * 10 + i, np.uint8)).save(tree / f"c{c}" / f"{i}.png")

    def order(*flags):
        out = tmp_path / "-".join(flags or ("default",))
        assert make_main(["imagefolder", "--root", str(tree), "--out", str(out), "--shard-size", "10", *flags]) == 0
        return [s.key for s in iter_samples(sorted(str(p) for p in out.glob("*.tar")), decode=False)]

    default, again, other, kept = order(), order("--seed", "0"), order("--seed", "1"), order("--no-shuffle")
    assert kept == sorted(kept) and sorted(default) == kept
    assert default == again != other and default != kept
    first_shard = {k.split("/")[0] for k in default[:10]}
    assert len(first_shard) > 1  # shards are not single-class


def test_non_finite_outputs_of_a_target_encoded_on_the_device_are_bad_samples(tiny_teacher, with_black_images,  # noqa: F811
                                                                              tmp_path, capsys, monkeypatch):
    """Patches encoded where the teacher runs (`--device-encode on`): a NaN patch grid still makes its sample
    bad, named by the target at fault, and the encoded rows that are kept are the good ones."""
    real = build.teacher_targets

    def nan_patches_on_constant_images(model, x, names):
        out = dict(real(model, x, names))
        constant = (x.flatten(2).std(2).amax(1) == 0).view(-1, 1, 1, 1)
        out["patches"] = torch.where(constant, torch.full_like(out["patches"], float("nan")), out["patches"])
        return out

    monkeypatch.setattr(build, "teacher_targets", nan_patches_on_constant_images)
    out = tmp_path / "c.zarr"
    args = build_args(tiny_teacher, with_black_images, out, "--codec", "patches=int8", "--view-spec", "eval",
                      "--device-encode", "on", "--max-bad-fraction", "0.2", views=2)
    assert cache_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 10 and summary["bad"] == 2
    marker = CacheStore.open(str(out)).completed()[shard_id_for(with_black_images[0])]
    assert {b["key"]: b["reason"] for b in marker["bad"]} == {
        "s-00003": "non-finite teacher output (patches)", "s-00008": "non-finite teacher output (patches)"}
    shard = CacheReader(str(out)).shard(with_black_images[0])
    assert "s-00008" not in shard.keys and len(shard) == 10 and np.isfinite(shard.targets["patches"]).all()
    host = tmp_path / "host.zarr"  # the same build encoded on the host keeps the same rows and bytes
    assert cache_main([host.as_posix() if a == str(out) else a for a in args[:-4]] + ["--device-encode", "off",
                                                                                   "--max-bad-fraction", "0.2"]) == 0
    capsys.readouterr()
    from tests.test_cache_cli import assert_same_store

    assert_same_store(out, host)
