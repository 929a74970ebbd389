import json

import numpy as np
import pytest
from PIL import Image

from kt.errors import UserError
from kt.shards import (BadSamples, expand_shards, iter_samples, labeled_subset, load_classes, split_urls,
                       write_shards)
from tools.make_shards import make_imagefolder


def test_expand_brace_dir_glob_and_url(fmnist):
    d = fmnist["root"] / "train"
    by_dir = expand_shards(str(d))
    assert [p.rsplit("/", 1)[1] for p in by_dir] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert expand_shards(f"{d}/train-{{000000..000002}}.tar") == by_dir
    assert expand_shards(f"{d}/train-*.tar") == by_dir
    assert expand_shards(f"{d}/train-000000.tar::{d}/train-000001.tar") == by_dir[:2]
    url = expand_shards(f"file://{d}/train-000000.tar")
    assert url == by_dir[:1]


@pytest.mark.parametrize("text, pattern", [
    ("{not json", "not JSON"),
    ('{"cat": 0, "dog": 1}', "must be a JSON list of class names (strings), not dict"),
    ("[0, 1, 2]", "not a list holding non-strings"),
    (b"\xff\xfe[]", "not JSON"),
])
def test_a_malformed_classes_json_is_refused_in_one_line(fmnist, tmp_path, capsys, text, pattern):
    """classes.json is a JSON list of names: anything else names the file in one line, here and wherever it is
    read (finetune, kt-student train --expect-classes), instead of a traceback or an object's keys taken as names."""
    import shutil

    from kt.student.cli import main
    from kt.student.distill import load_expected_classes

    data = tmp_path / "data"
    shutil.copytree(fmnist["root"] / "test", data)
    path = data / "classes.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match="classes.json") as e:
        load_classes(expand_shards(str(data)))
    assert pattern in str(e.value)
    for arg in (str(path), str(data)):
        with pytest.raises(UserError, match=pattern.split(" (")[0]):
            load_expected_classes(arg)
    capsys.readouterr()
    assert main(["finetune", "--model", "test_efficientnet", "--data", str(data), "--image-size", "32",
                 "--workers", "0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and pattern in err, err


@pytest.mark.parametrize("spec", ["/nonexistent/x.tar", "/nonexistent/{0..2}.tar", "", "/tmp/none-*.tar"])
def test_expand_missing_is_user_error(spec):
    with pytest.raises(UserError):
        expand_shards(spec)


def test_samples_keys_labels_and_order(fmnist):
    urls = expand_shards(str(fmnist["root"] / "train"))
    samples = list(iter_samples(urls))
    assert [s.key for s in samples] == [f"train-{i:05d}" for i in range(300)]
    from tools.make_shards import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    assert [s.label for s in samples] == labels[:300].tolist()
    assert np.array_equal(np.asarray(samples[7].image), images[7])
    assert load_classes(urls)[0] == "T-shirt/top"


def test_fsspec_url_reads_same_samples(fmnist):
    url = fmnist["train"][0]
    a = [s.key for s in iter_samples([url])]
    b = [s.key for s in iter_samples(["file://" + url])]
    assert a == b and len(a) == 100


def test_corrupt_members_are_skipped_counted_reported(corrupt_shard):
    bad = BadSamples(max_fraction=0.5)
    got = list(iter_samples(corrupt_shard, bad=bad))
    assert [s.key for s in got] == ["s0", "s1", "s2", "s4", "s6", "s7"]
    assert bad.total == 8 and sorted(b["key"] for b in bad.bad) == ["s3", "s5"]
    bad.check()  # 25% <= 50%
    strict = BadSamples(max_fraction=0.1)
    list(iter_samples(corrupt_shard, bad=strict))
    with pytest.raises(UserError, match="2 of 8 samples are bad"):
        strict.check()


def test_labeled_subset_exact_seeded_stable(fmnist, tmp_path):
    urls = fmnist["train"]
    a = labeled_subset(urls, 5, seed=1)
    counts = np.bincount([s.label for s in a])
    assert counts.tolist() == [5] * 10
    assert [s.key for s in labeled_subset(urls, 5, seed=1)] == [s.key for s in a]
    assert [s.key for s in labeled_subset(urls, 5, seed=2)] != [s.key for s in a]
    # same images re-sharded differently and in another order: same subset
    resharded = write_shards(reversed(list(iter_samples(urls))), tmp_path / "re", prefix="re", maxcount=37)
    assert [s.key for s in labeled_subset(resharded, 5, seed=1)] == [s.key for s in a]
    # a larger N holds the smaller N's images
    assert {s.key for s in a} <= {s.key for s in labeled_subset(urls, 8, seed=1)}


def test_labeled_subset_too_large_and_corrupt(fmnist, corrupt_shard):
    with pytest.raises(UserError, match="more than class"):
        labeled_subset(fmnist["train"], 1000, seed=0)
    bad = BadSamples(max_fraction=0.5)
    subset = labeled_subset(corrupt_shard, None, seed=0, bad=bad)
    assert sorted(s.key for s in subset) == ["s0", "s1", "s2", "s4", "s6", "s7"]
    assert {b["key"] for b in bad.bad} == {"s3", "s5"}
    # class 1 holds two good images (s1, s7): both are taken, the broken ones never
    two = labeled_subset(corrupt_shard, 2, seed=0, bad=BadSamples(0.5))
    assert {s.key for s in two if s.label == 1} == {"s1", "s7"} and len(two) == 4


def test_split_urls_disjoint_and_complete():
    urls = [f"u{i}" for i in range(10)]
    parts = [split_urls(urls, r, 2, w, 3) for r in range(2) for w in range(3)]
    flat = [u for p in parts for u in p]
    assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))


def test_imagefolder_to_shards(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "in" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / "in" / c / f"img {i}.png")
    written = make_imagefolder(tmp_path / "in", tmp_path / "out", shard_size=4, shuffle=False)
    assert len(written) == 2
    samples = list(iter_samples(written))
    assert [s.key for s in samples][:2] == ["cat/img_0", "cat/img_1"] and [s.label for s in samples] == [0] * 3 + [1] * 3
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]


def member_offsets(path) -> list[tuple[str, int, int]]:
    """(name, header offset, end of its data blocks) of each member of a tar file."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["inside-a-member", "between-a-samples-members", "between-samples",
                                 "before-the-end-blocks"])
def test_a_shard_cut_short_is_refused_not_read_as_shorter(fmnist, tmp_path, cut):
    """A partial copy of a shard loses its tail: tarfile reads a stream cut at a member boundary as the archive's
    end, and a cut inside a member as one unreadable entry, so the missing samples went uncounted (one "bad"
    entry at most). Every cut point is refused with one line naming the shard and how far it was read."""
    src = fmnist["train"][0]
    data = open(src, "rb").read()
    members = member_offsets(src)
    names = [name for name, _, _ in members]
    first, second = (names.index(f"train-00040.{ext}") for ext in ("cls", "png"))
    assert second == first + 1  # webdataset writes a sample's members in order: cls, then png
    at = {"inside-a-member": members[second][1] + 700, "between-a-samples-members": members[first][2],
          "between-samples": members[second][2], "before-the-end-blocks": members[-1][2]}[cut]
    (tmp_path / "cut").mkdir()
    shard = tmp_path / "cut" / "train-000000.tar"
    shard.write_bytes(data[:at])
    with pytest.raises(UserError) as e:
        list(iter_samples([str(shard)], bad=BadSamples(max_fraction=1.0)))
    line = str(e.value)
    assert "\n" not in line and f"shard {shard} is damaged after" in line, line
    # the samples passed on: each is held back until the next one begins, so a partial last one never is
    read = {"inside-a-member": 39, "between-a-samples-members": 40, "between-samples": 40,
            "before-the-end-blocks": 99}[cut]
    assert f"after {read} samples" in line, line
    # the whole shard, and the same shard gzipped (tarfile's "r|*" reads it; the decompressor checks its end)
    assert len(list(iter_samples([src]))) == 100
    import gzip

    gz = tmp_path / "train-000000.tar.gz"
    packed = gzip.compress(data)
    gz.write_bytes(packed)
    assert [s.key for s in iter_samples([str(gz)])] == [s.key for s in iter_samples([src])]
    gz.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(UserError, match="is damaged after"):
        list(iter_samples([str(gz)]))


def test_a_damaged_header_anywhere_is_refused(fmnist, tmp_path):
    """tarfile stops at a header it cannot parse (past the first) as if the archive ended there; it has read
    ahead of that header by up to a 10 KiB record, so a check of only the unread bytes missed the last ones.
    Every member's header damaged in turn, the last ones included: each is refused, none read as shorter."""
    src = fmnist["train"][0]
    whole = open(src, "rb").read()
    shard = tmp_path / "train-000000.tar"
    members = member_offsets(src)
    for i, (name, offset, _) in enumerate(members):
        data = bytearray(whole)
        data[offset + 148: offset + 156] = b"garbage!"  # the header's checksum field
        shard.write_bytes(bytes(data))
        with pytest.raises(UserError, match="is damaged after") as e:
            list(iter_samples([str(shard)]))
        if i == 120:
            assert "damaged after 59 samples: data after the point" in str(e.value)


def test_a_cut_after_a_member_ending_in_zeros_is_refused(tmp_path):
    """A shard cut right after a member whose last block is zeros (an .npy of zeros) ends in a zero block, as a
    whole archive does: a whole archive ends in two."""
    zeros = np.zeros(512, dtype=np.float32).tobytes()  # 2 KB of zeros
    samples = [{"__key__": f"s{i}", "npy": zeros, "cls": b"0"} for i in range(4)]
    src = write_shards(samples, tmp_path / "whole", prefix="z", maxcount=10)[0]
    names = [name for name, _, _ in member_offsets(src)]
    assert names[-1] == "s3.npy"
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(src, "rb").read()[: member_offsets(src)[-3][2]])  # after s2.npy
    from kt.shards import _raw_members

    assert [r["__key__"] for r in _raw_members(src)] == ["s0", "s1", "s2", "s3"]
    with pytest.raises(UserError, match="damaged after 2 samples: no end-of-archive blocks"):
        list(_raw_members(str(cut)))


def test_compressed_shards_are_checked_to_their_end(fmnist, tmp_path):
    """tarfile's own decompression never checks a compressed stream's end: a cut .tar.gz whose cut fell
    between members read as a shorter archive. Every cut point of the compressed file is refused."""
    import bz2
    import gzip
    import lzma

    src = fmnist["train"][0]
    data = open(src, "rb").read()
    keys = [s.key for s in iter_samples([src], decode=False)]
    for ext, pack in (("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)):
        whole = tmp_path / f"train-000000.tar.{ext}"
        whole.write_bytes(pack(data))
        assert [s.key for s in iter_samples([str(whole)], decode=False)] == keys
    packed = gzip.compress(data)
    cut = tmp_path / "cut.tar.gz"
    for at in range(10, len(packed) - 1, max(1, len(packed) // 60)):
        cut.write_bytes(packed[:at])
        with pytest.raises(UserError, match="is damaged after"):
            list(iter_samples([str(cut)], decode=False))


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar", "gnu-tar-cli"])
def test_shards_other_tar_writers_make_read_whole(fmnist, tmp_path, fmt):
    """The end check refuses no valid archive: tarfile's three formats, and GNU tar's own (record padding,
    other block factors) where `tar` is installed."""
    import shutil
    import subprocess
    import tarfile

    src = fmnist["train"][0]
    keys = [s.key for s in iter_samples([src], decode=False)]
    unpacked = tmp_path / "x"
    with tarfile.open(src) as tar:
        tar.extractall(unpacked, filter="data")
        names = tar.getnames()
    out = tmp_path / "other.tar"
    if fmt == "gnu-tar-cli":
        if shutil.which("tar") is None:
            pytest.skip("no tar here")
        for blocks in ("1", "20", "64"):
            subprocess.run(["tar", "-b", blocks, "-cf", str(out), *names], cwd=unpacked, check=True)
            assert [s.key for s in iter_samples([str(out)], decode=False)] == keys
        return
    with tarfile.open(out, "w", format={"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT,
                                         "ustar": tarfile.USTAR_FORMAT}[fmt]) as tar:
        for name in names:
            tar.add(unpacked / name, arcname=name)
    assert [s.key for s in iter_samples([str(out)], decode=False)] == keys



def _tiny_imagefolder(root):
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4), c * 10 + i, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("make_shards: error: "), err
    return err


@pytest.mark.parametrize("first, again, split", [
    (["photos", "--count", "4", "--size", "8", "--shard-size", "2"], ["--count", "2"], "."),
    (["imagefolder", "--shard-size", "2"], ["--shard-size", "4"], "."),
    (["fashion-mnist", "--limit", "4", "--shard-size", "2"], ["--shard-size", "4"], "test"),
    (["fmnist-seg", "--train", "4", "--test", "0", "--size", "16", "--shard-size", "2"], ["--train", "2"], "train"),
])
def test_makers_refuse_an_out_holding_an_earlier_runs_shards(tmp_path, capsys, first, again, split):
    """A rerun into the same --out is refused: write_shards only adds files, so the old run's extra shards
    would be read with the new ones (old samples, or one key in two shards)."""
    from tools.make_shards import main

    out = tmp_path / "out"
    if first[0] == "imagefolder":
        first = [*first, "--root", str(_tiny_imagefolder(tmp_path / "tree"))]
    assert main([*first, "--out", str(out)]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*.tar"))
    assert before and (out / split).is_dir()
    capsys.readouterr()
    assert main([*first, *again, "--out", str(out)]) == 2
    assert "already holds" in _one_error_line(capsys)
    assert sorted(p.relative_to(out) for p in out.rglob("*.tar")) == before


@pytest.mark.parametrize("argv, message", [
    (["photos", "--size", "0"], "--size must be >= 8, got 0"),
    (["photos", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["photos", "--count", "0"], "--count must be >= 1, got 0"),
    (["photos", "--shard-size", "0", "--count", "10"], "--shard-size must be >= 1, got 0"),
    (["fashion-mnist", "--limit", "-5"], "--limit must be >= 1, got -5"),
    (["fashion-mnist", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["imagefolder", "--root", "ROOT", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["imagefolder", "--root", "ROOT", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["fmnist-seg", "--seed", "-1", "--train", "2", "--test", "0"], "--seed must be >= 0, got -1"),
    (["fmnist-seg", "--train", "0", "--test", "0", "--transfer", "0"], "are all 0: nothing to write"),
    (["ade20k", "--root", "ROOT", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
])
def test_maker_numbers_out_of_range_are_one_line_errors(tmp_path, capsys, argv, message):
    from tools.make_shards import main

    root = str(_tiny_imagefolder(tmp_path / "tree"))
    argv = [root if a == "ROOT" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in _one_error_line(capsys)
    assert not list(tmp_path.glob("out/**/*.tar"))  # refused before anything is written
