"""kt-retrieve end to end through `main([...])`: embed, import, embed-text, curate, and the refusals;
multi-process and killed `embed` runs as `accelerate launch` subprocesses."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kt.retrieval.cli import main
from kt.retrieval.embeddings import load_embeddings

ENCODER = "test_efficientnet"  # timm's tiny test model: the architecture does not matter here
ROOT = Path(__file__).resolve().parents[1]


def write_npy_store(tmp_path, name, vectors, keys=None, encoder="enc-a"):
    np.save(tmp_path / f"{name}.npy", np.asarray(vectors, dtype=np.float32))
    keys = keys or [f"{name}{i}" for i in range(len(vectors))]
    (tmp_path / f"{name}.txt").write_text("\n".join(keys) + "\n")
    out = tmp_path / f"{name}.emb"
    assert main(["import", "--embeddings", str(tmp_path / f"{name}.npy"), "--keys", str(tmp_path / f"{name}.txt"),
                 "--encoder", encoder, "--out", str(out)]) == 0
    return str(out)


def manifest_rows(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(0)
    q = write_npy_store(tmp_path, "q", rng.normal(size=(4, 8)))
    g = write_npy_store(tmp_path, "g", rng.normal(size=(50, 8)))
    return tmp_path, q, g


def test_import_and_curate_outputs(stores):
    tmp_path, q, g = stores
    emb = load_embeddings(g)
    assert len(emb) == 50 and emb.dim == 8 and emb.keys[3] == "g3" and not emb.normalized
    out = tmp_path / "out"
    assert main(["curate", "--queries", q, "--gallery", g, "--strategy", "query-balanced", "--size", "13",
                 "--seed", "1", "--out", str(out)]) == 0
    rows = manifest_rows(out)
    assert len(rows) == 13 and set(rows[0]) == {"key", "query", "rank", "distance"}
    assert len({r["key"] for r in rows}) == 13
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size"] == 13 and summary["usable"] == 50 and summary["k"] >= 4
    assert (out / "coverage.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "nearest", "--size", "3"], "unknown strategy"),
    (["--size", "51"], "51"),
    (["--size", "0"], "--size 0: must be >= 1"),
    (["--size", "3", "--index", "hnsw"], "unknown index"),
])
def test_curate_refusals(stores, capsys, argv, message):
    tmp_path, q, g = stores
    assert main(["curate", "--queries", q, "--gallery", g, "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_mismatched_dims_and_encoders_refused(stores, capsys):
    tmp_path, q, _ = stores
    g9 = write_npy_store(tmp_path, "g9", np.ones((5, 9)))
    assert main(["curate", "--queries", q, "--gallery", g9, "--size", "1", "--out", str(tmp_path / "o")]) == 2
    assert "dimension" in capsys.readouterr().err
    gb = write_npy_store(tmp_path, "gb", np.ones((5, 8)), encoder="enc-b")
    assert main(["curate", "--queries", q, "--gallery", gb, "--size", "1", "--out", str(tmp_path / "o")]) == 2
    assert "encoder" in capsys.readouterr().err


def test_empty_queries_refused(stores, capsys):
    tmp_path, _, _g = stores
    np.save(tmp_path / "e.npy", np.zeros((0, 8), np.float32))
    (tmp_path / "e.txt").write_text("")
    assert main(["import", "--embeddings", str(tmp_path / "e.npy"), "--keys", str(tmp_path / "e.txt"),
                 "--encoder", "enc-a", "--out", str(tmp_path / "e.emb")]) == 2
    assert "non-empty" in capsys.readouterr().err


def test_import_key_count_mismatch_refused(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "x.txt").write_text("a\nb\n")
    assert main(["import", "--embeddings", str(tmp_path / "x.npy"), "--keys", str(tmp_path / "x.txt"),
                 "--encoder", "e", "--out", str(tmp_path / "x.emb")]) == 2
    assert "2 keys for 3" in capsys.readouterr().err


def test_exclude_reported(stores):
    tmp_path, q, g = stores
    gal = load_embeddings(g)
    ex = write_npy_store(tmp_path, "ex", gal.read(0, 3) + 1e-4)  # near-duplicates of rows 0..2
    out = tmp_path / "out"
    assert main(["curate", "--queries", q, "--gallery", g, "--strategy", "random", "--size", "47",
                 "--exclude", ex, "--exclude-threshold", "0.01", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["excluded"] == 3
    keys = {r["key"] for r in manifest_rows(out)}
    assert not keys & {"g0", "g1", "g2"}


# -------------------------------------------------------------------- images: embed and shard output
def make_shards(tmp_path, name, n, offset=0, per_shard=5):
    from kt.shards import write_shards

    rng = np.random.default_rng(offset)
    samples = [(f"{name}{i:04d}", Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)), i % 3)
               for i in range(n)]
    return write_shards(samples, tmp_path / name, prefix=name, maxcount=per_shard)


def test_embed_resume_and_curated_shards(tmp_path):
    make_shards(tmp_path, "gal", 12)
    make_shards(tmp_path, "lab", 3, offset=1)
    common = ["--encoder", ENCODER, "--pretrained", "none", "--image-size", "32", "--batch-size", "4"]
    g, q = str(tmp_path / "g.emb"), str(tmp_path / "q.emb")
    assert main(["embed", *common, "--data", str(tmp_path / "gal"), "--out", g]) == 0
    assert main(["embed", *common, "--data", str(tmp_path / "lab"), "--out", q]) == 0
    emb = load_embeddings(g)
    assert len(emb) == 12 and emb.normalized and list(emb.keys[:2]) == ["gal0000", "gal0001"]
    assert len(emb.source["shards"]) == 3 and emb.shard.tolist() == [0] * 5 + [1] * 5 + [2] * 2
    import zarr

    config = zarr.open_group(g, mode="r").attrs["run"]["config"]  # the resolved config, as asked
    assert (config["image_size"], config["batch_size"], config["pretrained"]) == (32, 4, "none")
    # resume: nothing left to do, same rows; without --resume the store is protected
    assert main(["embed", *common, "--data", str(tmp_path / "gal"), "--out", g, "--resume"]) == 0
    np.testing.assert_array_equal(load_embeddings(g).read(0, 12), emb.read(0, 12))
    assert main(["embed", *common, "--data", str(tmp_path / "gal"), "--out", g]) == 2

    out = tmp_path / "cur"
    assert main(["curate", "--queries", q, "--gallery", g, "--strategy", "best-matches", "--size", "7",
                 "--out", str(out)]) == 0
    from kt.shards import expand_shards, iter_samples

    keys = [s.key for s in iter_samples(expand_shards(str(out / "shards")))]
    manifest = [r["key"] for r in manifest_rows(out)]
    assert sorted(keys) == sorted(manifest) and len(keys) == 7


def test_embed_resume_after_interrupted_shard(tmp_path):
    from kt.retrieval.embeddings import StoreWriter

    make_shards(tmp_path, "gal", 10)
    common = ["--encoder", ENCODER, "--pretrained", "none", "--image-size", "32"]
    full, part = str(tmp_path / "full.emb"), str(tmp_path / "part.emb")
    assert main(["embed", *common, "--data", str(tmp_path / "gal"), "--out", full]) == 0
    ref = load_embeddings(full)
    # a run killed after the first shard and halfway through the second
    w = StoreWriter(part, ref.dim, ref.encoder, True, {"kind": "shards", "shards": ref.source["shards"]})
    w.append(ref.read(0, 5), ref.keys[:5], shard=0)
    w.commit(shard_done=ref.source["shards"][0])
    w.append(ref.read(5, 7), ref.keys[5:7], shard=1)
    assert len(load_embeddings(part, allow_unfinished=True)) == 5  # the half shard is not visible
    assert main(["embed", *common, "--data", str(tmp_path / "gal"), "--out", part, "--resume"]) == 0
    got = load_embeddings(part)
    assert list(got.keys) == list(ref.keys)
    np.testing.assert_allclose(got.read(0, 10), ref.read(0, 10), atol=1e-6)


def assert_same_store(got_path, ref_path):
    got, ref = load_embeddings(got_path), load_embeddings(ref_path)
    assert list(got.keys) == list(ref.keys)
    assert got.shard.tolist() == ref.shard.tolist() and got.labels.tolist() == ref.labels.tolist()
    np.testing.assert_allclose(got.read(0, len(got)), ref.read(0, len(ref)), atol=1e-6)
    assert got.source == ref.source and got.encoder == ref.encoder
    assert not (Path(got_path) / "parts").exists()  # consolidated and cleaned up


EMBED = ["--encoder", ENCODER, "--pretrained", "none", "--image-size", "32", "--batch-size", "4"]


@pytest.fixture
def four_shards(tmp_path):
    """22 images in 4 shards (the last one short) and the store one uninterrupted process writes."""
    make_shards(tmp_path, "gal", 22, per_shard=6)
    ref = tmp_path / "ref.emb"
    assert main(["embed", *EMBED, "--data", str(tmp_path / "gal"), "--out", str(ref)]) == 0
    assert len(load_embeddings(ref)) == 22
    return tmp_path, str(tmp_path / "gal"), ref


def test_embed_resumes_what_killed_processes_left(four_shards):
    """The state a killed 2-process run can leave: shard 0 committed, shard 1 half appended by the main
    process, complete parts for shards 1 and 3 from rank 1, a part's temporary file; shard 2 missing."""
    from kt.retrieval.embeddings import StoreWriter, write_part

    tmp_path, data, ref_path = four_shards
    ref = load_embeddings(ref_path)
    urls, rows = ref.source["shards"], lambda i: np.flatnonzero(ref.shard == i)
    out = tmp_path / "killed.emb"
    w = StoreWriter(out, ref.dim, ref.encoder, True, {"kind": "shards", "shards": urls})
    r0 = rows(0)
    w.append(ref.take(r0), ref.keys[r0], ref.labels[r0], shard=0)
    w.commit(shard_done=urls[0])
    for i in (1, 3):
        write_part(out, i, urls[i], ref.take(rows(i)), ref.keys[rows(i)], ref.labels[rows(i)])
    w.append(ref.take(rows(1))[:2], ref.keys[rows(1)][:2], shard=1)
    (out / "parts" / ".000002.0123.tmp").write_bytes(b"half a part")
    assert len(load_embeddings(out, allow_unfinished=True)) == len(r0)  # readers see committed shards only
    assert main(["embed", *EMBED, "--data", data, "--out", str(out)]) == 2  # protected without --resume
    assert main(["embed", *EMBED, "--data", data, "--out", str(out), "--resume"]) == 0
    assert_same_store(out, ref_path)


def test_embed_crashed_after_some_shards_resumes(four_shards, monkeypatch, capsys):
    import kt.retrieval.embed as E

    class Killed(BaseException):
        pass

    tmp_path, data, ref_path = four_shards
    written = []
    real_write_part = E.write_part

    def write_part_then_die(*args, **kwargs):
        real_write_part(*args, **kwargs)
        written.append(args[1])
        if len(written) == 3:  # shard 2's part is on disk, not yet in the store
            raise Killed

    out = tmp_path / "crashed.emb"
    monkeypatch.setattr(E, "write_part", write_part_then_die)
    with pytest.raises(Killed):
        main(["embed", *EMBED, "--data", data, "--out", str(out)])
    assert load_embeddings(out, allow_unfinished=True).shard.tolist() == [0] * 6 + [1] * 6
    monkeypatch.setattr(E, "write_part", real_write_part)
    capsys.readouterr()
    assert main(["embed", *EMBED, "--data", data, "--out", str(out), "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards_skipped"] == 3 and summary["shards_embedded"] == 1 and summary["samples"] == 4
    assert_same_store(out, ref_path)


# `accelerate launch --cpu --num_processes 2` starts ONE process without an MPI hostfile (accelerate's
# multi-CPU launcher is mpirun); `--multi_gpu` goes through torchrun, and on a host without GPUs the ranks
# form a gloo group (embed asks PartialState for cpu when there is no GPU).
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([*LAUNCH, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def rank_summaries(stdout):
    return sorted((json.loads(line) for line in stdout.splitlines() if line.startswith("{")),
                  key=lambda s: s["rank"])


@pytest.mark.slow
def test_two_processes_embed_the_same_store(four_shards):
    tmp_path, data, ref_path = four_shards
    out = tmp_path / "two.emb"
    result = launch(["-m", "kt.retrieval.cli", "embed", *EMBED, "--data", data, "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = rank_summaries(result.stdout)
    assert [(s["rank"], s["processes"]) for s in summaries] == [(0, 2), (1, 2)]
    assert [s["samples"] for s in summaries] == [12, 10]  # shards 0, 2 and 1, 3: disjoint, all of them
    assert_same_store(out, ref_path)


KILL_MAIN_AFTER_ITS_FIRST_PART = """
import os, signal
import kt.retrieval.embed as E
from accelerate import PartialState

real_write_part = E.write_part

def write_part(*args, **kwargs):
    real_write_part(*args, **kwargs)
    if PartialState().is_main_process:
        os.kill(os.getpid(), signal.SIGKILL)  # before it commits anything

E.write_part = write_part
from kt.retrieval.cli import main
raise SystemExit(main())
"""


@pytest.mark.slow
def test_killed_two_process_embed_resumes(four_shards):
    tmp_path, data, ref_path = four_shards
    script = tmp_path / "kill_main.py"
    script.write_text(KILL_MAIN_AFTER_ITS_FIRST_PART)
    out = tmp_path / "killed.emb"
    args = ["embed", *EMBED, "--data", data, "--out", str(out)]
    killed = launch([str(script), *args])
    assert killed.returncode != 0
    assert len(load_embeddings(out, allow_unfinished=True)) == 0 and (out / "parts" / "000000.npz").exists()
    result = launch(["-m", "kt.retrieval.cli", *args, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = rank_summaries(result.stdout)
    assert summaries[0]["shards_skipped"] >= 1 and sum(s["shards_embedded"] for s in summaries) <= 3
    assert_same_store(out, ref_path)


# ----------------------------------------------------------------------------------------- text queries
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_clip(tmp_path):
    import open_clip

    path = tmp_path / "KtTinyClip.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return "open_clip:KtTinyClip"


def test_embed_text_and_text_queries(tmp_path, tiny_clip, capsys):
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog", "ship"]))
    q = str(tmp_path / "text.emb")
    assert main(["embed-text", "--encoder", tiny_clip, "--pretrained", "none", "--classes",
                 str(tmp_path / "classes.json"), "--templates", "simple", "--out", q]) == 0
    emb = load_embeddings(q)
    assert len(emb) == 3 and emb.dim == 16 and emb.normalized and list(emb.keys) == ["cat", "dog", "ship"]
    np.testing.assert_allclose(np.linalg.norm(emb.read(0, 3), axis=1), 1, atol=1e-5)
    import zarr

    config = zarr.open_group(q, mode="r").attrs["run"]["config"]
    assert config["templates"] == "simple" and config["classes"] == str(tmp_path / "classes.json")
    # text queries against an image gallery of the same CLIP model
    make_shards(tmp_path, "gal", 8)
    g = str(tmp_path / "g.emb")
    assert main(["embed", "--encoder", tiny_clip, "--pretrained", "none", "--image-size", "32",
                 "--data", str(tmp_path / "gal"), "--out", g]) == 0
    out = tmp_path / "cur"
    assert main(["curate", "--queries", q, "--gallery", g, "--size", "5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["coverage"]["per_class"].values()) == 5
    # missing class names
    (tmp_path / "bad.json").write_text(json.dumps({"0": "cat", "2": "ship"}))
    assert main(["embed-text", "--encoder", tiny_clip, "--pretrained", "none", "--classes",
                 str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad.emb")]) == 2
    assert "no class name for index 1" in capsys.readouterr().err
    (tmp_path / "bad2.json").write_text(json.dumps(["cat", ""]))
    assert main(["embed-text", "--encoder", tiny_clip, "--pretrained", "none", "--classes",
                 str(tmp_path / "bad2.json"), "--out", str(tmp_path / "bad2.emb")]) == 2
    assert "class 1 has no name" in capsys.readouterr().err


def test_embed_with_a_checkpoint_needs_no_pretrained_flag(tmp_path):
    """A run or checkpoint folder carries its weights: `embed --encoder RUN` works without `--pretrained none`
    (the default `auto` means hub for a name, the folder's own weights for a path), and gives the vectors
    the checkpoint's model computes."""
    import torch

    from kt.checkpoints import save_checkpoint
    from kt.models import create_model

    torch.manual_seed(3)
    ckpt = save_checkpoint(create_model(ENCODER, num_classes=3, image_size=32), tmp_path / "run" / "checkpoint")
    make_shards(tmp_path, "gal", 6)
    out = tmp_path / "g.emb"
    assert main(["embed", "--encoder", str(tmp_path / "run"), "--data", str(tmp_path / "gal"), "--out", str(out),
                 "--image-size", "32", "--no-normalize"]) == 0
    emb = load_embeddings(str(out))
    assert emb.encoder["pretrained"] == "none" and emb.encoder["model"]["weights_sha256"]
    from kt.checkpoints import load_checkpoint
    from kt.shards import expand_shards, iter_samples
    from kt.views import VIEW_PRESETS, render, sample_params, to_tensor

    model = load_checkpoint(ckpt).eval()
    s = next(iter(iter_samples(expand_shards(str(tmp_path / "gal")))))
    x = to_tensor(render(s.image, sample_params(VIEW_PRESETS["eval"], 0, s.key, 0), 32), model.mean, model.std)
    with torch.no_grad():
        want = model.forward_features(x[None])["embedding"][0].numpy()
    np.testing.assert_allclose(emb.read(0, 1)[0], want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- reviewed defects: refusals
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kt-retrieve: error: ") and "Traceback" not in err, err
    return err


def image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8))


def test_curated_image_comes_from_its_rows_shard(tmp_path):
    """galA holds a test image under key `dup`, galB another image under the same key: the excluded row is
    galA's, so the curated `dup` must be galB's image, not the first sample named `dup`."""
    from kt.errors import UserError
    from kt.retrieval.curate import Selection
    from kt.retrieval.output import copy_images
    from kt.shards import expand_shards, iter_samples, write_shards

    test_img, other = image(100), image(200)
    write_shards([(f"a{i}", image(i), 0) for i in range(3)] + [("dup", test_img, 0)], tmp_path / "galA", prefix="a")
    write_shards([(f"b{i}", image(10 + i), 0) for i in range(3)] + [("dup", other, 0)], tmp_path / "galB",
                 prefix="b")
    write_shards([("t0", test_img, 0)], tmp_path / "test", prefix="test")
    write_shards([("q0", image(300), 0)], tmp_path / "lab", prefix="lab")
    stores = {}
    for name, data in (("g", f"{tmp_path / 'galA'}::{tmp_path / 'galB'}"), ("t", str(tmp_path / "test")),
                       ("q", str(tmp_path / "lab"))):
        stores[name] = str(tmp_path / f"{name}.emb")
        assert main(["embed", *EMBED, "--data", data, "--out", stores[name]]) == 0
    out = tmp_path / "cur"
    assert main(["curate", "--queries", stores["q"], "--gallery", stores["g"], "--exclude", stores["t"],
                 "--strategy", "random", "--size", "7", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["excluded"] == 1
    curated = {s.key: s.raw for s in iter_samples(expand_shards(str(out / "shards")), decode=False, keep_raw=True)}
    want = {s.key: s.raw for s in iter_samples(expand_shards(str(tmp_path / "galB")), decode=False, keep_raw=True)}
    assert sorted(curated) == sorted(r["key"] for r in manifest_rows(out))
    assert curated["dup"] == want["dup"]  # galB's image: the test image stays out
    # a selection holding one key from two shards (only the library API can make one) is refused by name
    gallery = load_embeddings(stores["g"])
    rows = np.flatnonzero(gallery.keys == "dup")
    sel = Selection(rows, np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros(2), {})
    with pytest.raises(UserError, match=r"'dup' twice \(from .*a-000000.tar and .*b-000000.tar\)"):
        copy_images(tmp_path / "cur2", sel, gallery)


def test_curate_out_checked_before_search(stores, capsys, monkeypatch):
    """An --out holding a curated set (a rerun would mix two runs' shards), a file, or a path under a file is
    refused in one line before any search work; an empty existing folder is fine."""
    import kt.retrieval.curate as C

    tmp_path, q, g = stores
    out = tmp_path / "out"
    out.mkdir()
    curate = ["curate", "--queries", q, "--gallery", g, "--strategy", "random", "--size", "5"]
    assert main([*curate, "--out", str(out)]) == 0
    before = (out / "manifest.csv").read_text()

    def no_search(*args, **kwargs):
        raise AssertionError("search ran before --out was checked")

    monkeypatch.setattr(C, "curate", no_search)
    assert main([*curate, "--seed", "3", "--out", str(out)]) == 2
    assert "already holds a curated set" in one_error_line(capsys)
    assert (out / "manifest.csv").read_text() == before
    (tmp_path / "afile").write_text("x")
    assert main([*curate, "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in one_error_line(capsys)
    assert main([*curate, "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "which is a file" in one_error_line(capsys)


def test_unfinished_store_refused(stores, capsys):
    """A shards-sourced store whose embed was killed after its first shard is refused as gallery and as
    --exclude set (a test set missing images would let them into the curated set); finished, it is read."""
    from kt.retrieval.embeddings import StoreWriter

    tmp_path, q, g = stores
    ref = load_embeddings(g)
    urls = [str(tmp_path / "s0.tar"), str(tmp_path / "s1.tar")]
    part = tmp_path / "part.emb"
    w = StoreWriter(part, ref.dim, ref.encoder, ref.normalized, {"kind": "shards", "shards": urls})
    w.append(ref.read(0, 3), ref.keys[:3], shard=0)
    w.commit(shard_done=urls[0])
    curate = ["curate", "--queries", q, "--strategy", "random", "--size", "5", "--no-shards"]
    assert main([*curate, "--gallery", str(part), "--out", str(tmp_path / "o1")]) == 2
    assert "unfinished: 1 of 2 shards" in one_error_line(capsys)
    assert main([*curate, "--gallery", g, "--exclude", str(part), "--out", str(tmp_path / "o2")]) == 2
    assert "embed --resume" in one_error_line(capsys)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    w.append(ref.read(3, 6), ref.keys[3:6], shard=1)
    w.commit(shard_done=urls[1])
    assert main([*curate, "--gallery", g, "--exclude", str(part), "--exclude-threshold", "1e-4",
                 "--out", str(tmp_path / "o3")]) == 0
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["excluded"] == 6


def test_embed_resume_refuses_other_normalize_or_image_size(tmp_path, capsys):
    make_shards(tmp_path, "gal", 3)
    g = str(tmp_path / "g.emb")
    assert main(["embed", *EMBED, "--data", str(tmp_path / "gal"), "--out", g]) == 0
    rows = load_embeddings(g).read(0, 3)
    capsys.readouterr()
    assert main(["embed", *EMBED, "--no-normalize", "--data", str(tmp_path / "gal"), "--out", g, "--resume"]) == 2
    assert "--normalize" in one_error_line(capsys)
    other_size = [a if a != "32" else "48" for a in EMBED]
    assert main(["embed", *other_size, "--data", str(tmp_path / "gal"), "--out", g, "--resume"]) == 2
    assert "--image-size 32, not 48" in one_error_line(capsys)
    np.testing.assert_array_equal(load_embeddings(g).read(0, 3), rows)


def test_ivfpq_on_a_small_gallery_refused(stores, capsys):
    tmp_path, q, g = stores
    assert main(["curate", "--queries", q, "--gallery", g, "--index", "ivfpq", "--pq-m", "8", "--size", "10",
                 "--no-shards", "--out", str(tmp_path / "o")]) == 2
    assert "needs at least 256 usable gallery rows" in one_error_line(capsys)


def test_ivfpq_without_recall_queries_prints_valid_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    q = write_npy_store(tmp_path, "q", rng.normal(size=(3, 8)))
    g = write_npy_store(tmp_path, "g", rng.normal(size=(300, 8)))
    capsys.readouterr()
    assert main(["curate", "--queries", q, "--gallery", g, "--index", "ivfpq", "--pq-m", "4", "--nlist", "2",
                 "--recall-queries", "0", "--size", "10", "--no-shards", "--out", str(tmp_path / "o")]) == 0

    def no_nan(name):
        raise AssertionError(f"{name} is not JSON")

    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line, parse_constant=no_nan)["ivfpq_recall_at_10"] is None
    summary = json.loads((tmp_path / "o" / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["ivfpq_recall_at_10"] is None and summary["size"] == 10


def test_import_of_npz_or_empty_file_refused(tmp_path, capsys):
    np.savez(tmp_path / "e.npz", emb=np.ones((3, 8), np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "s.npy", np.array([["a", "b"], ["c", "d"], ["e", "f"]]))
    (tmp_path / "k.txt").write_text("a\nb\nc\n")
    for name, message in (("e.npz", "is a .npz archive (emb)"), ("empty.npy", "cannot read"),
                          ("s.npy", "not numbers")):
        out = tmp_path / f"{name}.emb"
        assert main(["import", "--embeddings", str(tmp_path / name), "--keys", str(tmp_path / "k.txt"),
                     "--encoder", "x", "--out", str(out)]) == 2
        assert message in one_error_line(capsys) and not out.exists()


def test_embed_image_size_the_encoder_cannot_take(tmp_path, capsys):
    """A ViT at a size its patch does not divide is refused before the store exists, so the corrected
    rerun needs no --resume."""
    make_shards(tmp_path, "lab", 2)
    out = tmp_path / "v.emb"
    vit = ["embed", "--encoder", "test_vit", "--pretrained", "none", "--data", str(tmp_path / "lab"), "--out", str(out)]
    assert main([*vit, "--image-size", "30"]) == 2
    assert "image size 30 is not a multiple of 16" in one_error_line(capsys) and not out.exists()
    assert main([*vit, "--image-size", "32"]) == 0
    assert len(load_embeddings(out)) == 2


def test_curate_yaml_ivfpq_mapping_is_used_and_recorded(tmp_path, capsys):
    import yaml

    rng = np.random.default_rng(0)
    q = write_npy_store(tmp_path, "q", rng.normal(size=(3, 16)))
    g = write_npy_store(tmp_path, "g", rng.normal(size=(300, 16)))
    cfg = tmp_path / "cur.yaml"
    cfg.write_text(f"queries: {q}\ngallery: {g}\nsize: 10\nindex: ivfpq\nshards: false\nrecall_queries: 0\n"
                   "ivfpq: {nlist: 4, pq_m: 4, train_size: 1000}\n")
    out = tmp_path / "o"
    assert main(["curate", "--config", str(cfg), "--nprobe", "3", "--out", str(out)]) == 0
    run = json.loads((out / "summary.json").read_text())["run"]
    # the file's mapping (nlist, pq_m, and train_size, which has no flag), then the flag, in the record
    assert run["config"]["ivfpq"] == {"nlist": 4, "pq_m": 4, "nbits": 8, "nprobe": 3, "train_size": 1000,
                                      "seed": 0, "rerank": 4, "rerank_rows": 131072}
    assert (run["config"]["nlist"], run["config"]["pq_m"], run["config"]["nprobe"]) == (4, 4, 3)
    # the recorded config is a --config file again
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump({**run["config"], "out": str(tmp_path / "o2")}))
    capsys.readouterr()
    assert main(["curate", "--config", str(again)]) == 0
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["run"]["config"] == {
        **run["config"], "out": str(tmp_path / "o2")}


@pytest.mark.parametrize("mapping, message", [
    ("{nlist: 4, pq: 4}", "unknown field(s) in ivfpq"),
    ("4", "ivfpq in"),
])
def test_curate_yaml_ivfpq_refusals(stores, capsys, mapping, message):
    tmp_path, q, g = stores
    cfg = tmp_path / "cur.yaml"
    cfg.write_text(f"queries: {q}\ngallery: {g}\nsize: 3\nindex: ivfpq\nivfpq: {mapping}\n")
    assert main(["curate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert message in one_error_line(capsys)
    cfg.write_text(f"queries: {q}\ngallery: {g}\nsize: 3\nnlist: 8\nivfpq: {{nlist: 4}}\n")
    assert main(["curate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "sets nlist twice" in one_error_line(capsys)


def test_curate_summary_records_the_resolved_config(stores):
    tmp_path, q, g = stores
    out = tmp_path / "out"
    assert main(["curate", "--queries", q, "--gallery", g, "--size", "5", "--block-size", "7",
                 "--exclude-threshold", "0.02", "--nlist", "9", "--rerank", "2", "--out", str(out)]) == 0
    config = json.loads((out / "summary.json").read_text())["run"]["config"]
    assert config["block_size"] == 7 and config["exclude_threshold"] == 0.02 and config["size"] == 5
    assert config["copy_threshold"] == 1e-6 and config["strategy"] == "query-balanced"
    assert config["ivfpq"]["nlist"] == 9 and config["ivfpq"]["rerank"] == 2 and config["nprobe"] == 32


def test_stores_record_the_resolved_config(stores):
    import zarr

    tmp_path, q, _ = stores
    run = dict(zarr.open_group(q, mode="r").attrs["run"])
    assert run["config"]["encoder"] == "enc-a" and run["config"]["normalize"] is False
    assert run["config"]["out"] == q
