"""kt-retrieve end to end through `main([...])`: embed, import, embed-text, curate, and the refusals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from retrieval.cli import main
from retrieval.store import load_embeddings

ENCODER = "test_efficientnet"  # timm's tiny test model: the architecture does not matter here


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
    (["--size", "0"], "positive"),
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
    from retrieval.store import StoreWriter

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
    assert len(load_embeddings(part)) == 5  # the half shard is not visible
    assert main(["embed", *common, "--data", str(tmp_path / "gal"), "--out", part, "--resume"]) == 0
    got = load_embeddings(part)
    assert list(got.keys) == list(ref.keys)
    np.testing.assert_allclose(got.read(0, 10), ref.read(0, 10), atol=1e-6)


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
