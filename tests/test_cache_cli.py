"""kt-cache in-process through `main([...])`, and as killed / multi-process subprocesses.

Subprocess builds run with one thread (OMP_NUM_THREADS=1), as does their in-process reference, so that
"the same arrays" means bit-identical.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from kt.errors import UserError
from kt.shards import write_shards
from kt.teacher_cache.cli import main, split_codec_flags
from kt.teacher_cache.store import CacheStore, shard_id_for
from tests.test_reader import build_args, tiny_teacher  # noqa: F401 -- the fixture
from tools.kill_soak import store_arrays as arrays, store_differences  # noqa: F401 -- arrays: other tests' import

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_shards(fmnist, tmp_path_factory) -> list[str]:
    """Four shards of 12 Fashion-MNIST images: resume and multi-rank need several shards."""
    from tools.make_shards import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return write_shards(((f"s-{i:05d}", Image.fromarray(images[i], mode="L"), int(labels[i])) for i in range(48)),
                        tmp_path_factory.mktemp("small"), prefix="small", maxcount=12,
                        classes=FASHION_MNIST_CLASSES)


#: how the kill/resume, multi-process and s3:// builds build, so that they all compare with `one_process_build`
RESUME_BUILD = ("--batch-size", "4", "--codec", "patches=pca:d=16,int8")


@pytest.fixture(scope="module")
def one_process_build(tiny_teacher, small_shards, tmp_path_factory):  # noqa: F811
    """The uninterrupted one-process local build of `small_shards` that s3:// and multi-node builds must equal."""
    out = tmp_path_factory.mktemp("one-process") / "cache.zarr"
    single_thread_build(build_args(tiny_teacher, small_shards, out, *RESUME_BUILD))
    return out


@pytest.fixture(scope="module")
def built(tiny_teacher, fmnist, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("built") / "cache.zarr"
    assert main(build_args(tiny_teacher, fmnist["train"][:2], out, "--codec", "patches=pca:d=16,int8")) == 0
    return out


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "\r" not in line and line.strip()]  # minus the progress bar
    assert len(lines) == 1 and lines[0].startswith("kt-cache: error: ") and "Traceback" not in err, err
    return lines[0]


def assert_same_store(a, b) -> None:
    assert store_differences(a, b) == []


def single_thread_build(argv) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------------------------- build
def test_codec_flags_split_on_target_names_only():
    assert split_codec_flags(["logits=topk:k=10,patches=pca:d=64,int8", "embedding=int8"]) == \
        ["logits=topk:k=10", "patches=pca:d=64,int8", "embedding=int8"]


def test_build_info_plan_agree(built, tiny_teacher, fmnist, capsys):  # noqa: F811
    capsys.readouterr()
    assert main(["info", str(built), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards"] == {"complete": 2, "expected": 2, "incomplete": [], "written_without_marker": []}
    assert info["samples"] == 200 and info["bad"]["count"] == 0
    assert info["targets"]["patches"]["codec"] == "pca:d=16,int8"
    assert info["teacher"]["arch"] == "test_vit" and info["view"]["views_per_image"] == 2
    data = "::".join(fmnist["train"][:2])
    assert main(["plan", "--teacher", tiny_teacher, "--targets", "logits,embedding,patches", "--views", "2",
                 "--codec", "patches=pca:d=16,int8", "--data", data, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # logits topk:k=10 of 10 classes: 10 fp16 values + 10 uint8 indices + fp16 tail
    assert plan["targets"]["logits"]["bytes_per_view"] == 32
    assert plan["targets"]["patches"]["bytes_per_view"] == 2 * 2 * (16 + 4)  # int8 + float32 scale per token
    assert plan["total_bytes"] == info["bytes"]["predicted"]
    assert 0.2 < info["bytes"]["stored"] / plan["total_bytes"] < 2.0
    assert main(["info", str(built)]) == 0
    human = capsys.readouterr().out
    assert "2 / 2 complete" in human and "pca:d=16,int8" in human


def test_plan_with_num_samples_prints_a_table(tiny_teacher, capsys):  # noqa: F811
    assert main(["plan", "--teacher", tiny_teacher, "--targets", "logits,patches", "--views", "4",
                 "--num-samples", "1000000"]) == 0
    out = capsys.readouterr().out
    assert "predicted size at most" in out and "topk:k=10" in out and "auto:cos=0.98" in out


def test_plan_measures_the_data_path_on_the_transfer_sets_own_images(tiny_teacher, fmnist, capsys, monkeypatch):  # noqa: F811
    """`plan --measure N` times the build's own worker code (`ShardViewBatches`) on the data's first images and
    reports CPU ms per view, views/s per core and the worker cores per 1,000 teacher views/s."""
    from kt.teacher_cache import build

    shards = []
    real = build.ShardViewBatches.shard_batches
    monkeypatch.setattr(build.ShardViewBatches, "shard_batches",
                        lambda self, url: shards.append(url) or real(self, url))
    argv = ["plan", "--teacher", tiny_teacher, "--targets", "logits", "--views", "2", "--data", fmnist["train"][0]]
    assert main(argv + ["--measure", "48", "--view-spec", "light", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["data_path"]
    assert shards == [fmnist["train"][0]]  # the build's worker path, stopped once enough views were timed
    assert d["views"] == 48 and d["views_per_image"] == 2 and d["view_spec"] == "light"
    assert d["median_source"] == "28x28" and d["image_size"] == 32
    assert d["cpu_ms_per_view"] > 0
    assert d["views_per_s_per_core"] == pytest.approx(1e3 / d["cpu_ms_per_view"], rel=0.01)
    assert main(argv + ["--measure", "16"]) == 0
    assert "views/s per core" in capsys.readouterr().out
    err = one_line_error(capsys, ["plan", "--teacher", tiny_teacher, "--num-samples", "10", "--measure", "8"])
    assert "--measure needs --data" in err


def test_verify_clean_then_damaged(built, tiny_teacher, tmp_path, capsys):  # noqa: F811
    assert main(["verify", str(built), "--samples", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["samples_checked"] == 12
    assert report["fidelity"]["logits"]["top1_agreement"] == 1.0
    assert report["fidelity"]["embedding"]["cosine_min"] > 0.999
    assert report["consistency"]["patches"]["cosine_min"] > 0.999

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(built, damaged)
    sid = min(CacheStore.open(str(damaged)).completed())
    zarr.open_group(str(damaged), mode="r+")[f"shards/{sid}/targets/embedding/values"][0, 0, :4] = 7.0
    os.remove(damaged / "complete" / sorted(CacheStore.open(str(damaged)).completed())[1] / "zarr.json")
    assert main(["verify", str(damaged), "--samples", "0"]) == 1
    out = capsys.readouterr().out
    assert "checksum mismatch in targets/embedding/values" in out and "1 of 2 input shards incomplete" in out


def test_a_resume_over_more_shards_lists_them_and_verify_runs_from_anywhere(tiny_teacher, small_shards, tmp_path,
                                                                            monkeypatch, capsys):  # noqa: F811
    """Relative --teacher and --data, a transfer set grown between runs: the cache lists every shard it holds,
    at absolute paths, so `kt-cache verify` with its defaults checks them all from another directory."""
    (tmp_path / "data").mkdir()
    for url in small_shards:
        shutil.copy(url, tmp_path / "data")
    shutil.copytree(Path(tiny_teacher), tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    assert main(build_args("teacher", "data/small-{000000..000001}.tar", "c.zarr")) == 0
    assert main(build_args("teacher", "data", "c.zarr")) == 0
    attrs = CacheStore.open(tmp_path / "c.zarr").attrs
    assert attrs["input_shards"] == {shard_id_for(u): str(tmp_path / "data" / Path(u).name) for u in small_shards}
    assert attrs["build_config"]["teacher"] == str(tmp_path / "teacher")
    monkeypatch.chdir("/")
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "c.zarr"), "--samples", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["samples_checked"] == 8 and report["shards"] == {"complete": 4, "expected": 4, "checked": 4}


def test_verify_names_a_damaged_codec_state(built, tmp_path, capsys):
    """One changed value in the PCA basis: verify reports it and exits 1 (re-encoding with the same damaged
    codec, its consistency check, agreed with the cached values), and the reader refuses the cache."""
    from kt.teacher_cache.reader import CacheReader

    damaged = tmp_path / "basis.zarr"
    shutil.copytree(built, damaged)
    basis = zarr.open_group(str(damaged), mode="r+")["codecs/patches/basis"]
    value = basis[...]
    value[0, 0] *= -1e6
    basis[...] = value
    capsys.readouterr()
    assert main(["verify", str(damaged), "--samples", "8"]) == 1
    assert "the codec state of patches is damaged (basis: checksum mismatch)" in capsys.readouterr().out
    with pytest.raises(UserError, match="codec state of patches is damaged"):
        CacheReader(str(damaged)).shard(min(CacheStore.open(str(damaged)).completed())).get("patches", [0])


def test_verify_refuses_another_teacher(built, tmp_path, capsys):
    from kt.checkpoints import save_checkpoint
    from kt.models import create_model

    other = save_checkpoint(create_model("test_vit", num_classes=10, image_size=32), tmp_path / "other")
    err = one_line_error(capsys, ["verify", str(built), "--teacher", str(other), "--samples", "4"])
    assert "weights_sha256 differs" in err


def test_bad_samples_recorded_and_counted(tiny_teacher, corrupt_shard, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "bad.zarr"
    assert main(build_args(tiny_teacher, corrupt_shard, out, "--max-bad-fraction", "0.5", "--codec", "patches=fp16",
                           views=1)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 6 and summary["bad"] == 2
    marker = CacheStore.open(str(out)).completed()[shard_id_for(corrupt_shard[0])]
    assert marker["n_samples"] == 6 and marker["n_bad"] == 2
    reasons = {b["key"]: b["reason"] for b in marker["bad"]}
    assert sorted(reasons) == ["s3", "s5"]
    assert "no image member" in reasons["s5"] and reasons["s3"]
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bad"]["count"] == 2 and {b["key"] for b in info["bad"]["first"]} == {"s3", "s5"}
    err = one_line_error(capsys, build_args(tiny_teacher, corrupt_shard, tmp_path / "strict.zarr", "--codec", "patches=fp16",
                                                  views=1))
    assert "2 of 8 samples are bad" in err
    # the same command again: its shards are complete, but the build still fails (markers keep the counts)
    err = one_line_error(capsys, build_args(tiny_teacher, corrupt_shard, tmp_path / "strict.zarr", "--codec", "patches=fp16",
                                            views=1))
    assert "2 of 8 samples are bad" in err


# ------------------------------------------------------------------------------------------ refusals
def test_bad_input_is_one_line_exit_2(built, tiny_teacher, fmnist, tmp_path, capsys):  # noqa: F811
    data = fmnist["train"][0]
    cases = [
        (build_args(str(tmp_path / "no" / "teacher"), data, tmp_path / "a.zarr"), "teacher not found"),
        (build_args(tiny_teacher, str(tmp_path / "missing.tar"), tmp_path / "a.zarr"), "shard not found"),
        (build_args(tiny_teacher, data, tmp_path / "a.zarr", "--codec", "logits=topk:k=x"), "positive integer k"),
        (build_args(tiny_teacher, data, tmp_path / "a.zarr", "--codec", "patches=zip"), "unknown codec 'zip'"),
        (build_args(tiny_teacher, data, tmp_path / "a.zarr", "--codec", "logits=pca:d=4"), "unknown codec"),
        (build_args(tiny_teacher, data, tmp_path / "a.zarr", "--codec", "patches=pca:d=128"),
         "d=128 exceeds the 64 channels of patches"),
        (build_args(tiny_teacher, data, tmp_path / "a.zarr")[:-2] + ["--targets", "logits,depth"],
         "unknown target 'depth'"),
        (["build", "--teacher", "test_vit", "--data", data, "--out", str(tmp_path / "a.zarr"),
          "--image-size", "32", "--targets", "logits"], "needs a teacher with a task head"),
        (build_args(tiny_teacher, data, built, "--codec", "patches=pca:d=16,int8")[:-2] + ["--seed", "5"],
         "holds another cache"),
        (["info", str(tmp_path / "nothing")], "no kt cache"),
        (["plan", "--teacher", tiny_teacher, "--codec", "logits=topk", "--num-samples", "5"], "positive integer k"),
        (["verify", str(tmp_path / "nothing.zarr")], "no kt cache"),
    ]
    for argv, needle in cases:
        err = one_line_error(capsys, argv)
        assert needle in err, (argv, err)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    assert "not a kt cache" in one_line_error(capsys, ["info", str(tmp_path / "plain.zarr")])
    assert not (tmp_path / "a.zarr").exists()
    # where a cache cannot be written: a file, a path under a file, an unknown or unavailable protocol
    (tmp_path / "afile").write_text("hi")
    for out, needle in [(tmp_path / "afile", "is a file; a cache is a folder"),
                        (tmp_path / "afile" / "x.zarr", "cannot create its lock file"),
                        ("foo://x.zarr", "Protocol not known"), ("nosuchfs://b/x.zarr", "cannot write")]:
        assert needle in one_line_error(capsys, build_args(tiny_teacher, data, out)), out
    for argv in (build_args(tiny_teacher, "foo://b/x.tar", tmp_path / "b.zarr"),
                 ["plan", "--teacher", tiny_teacher, "--data", "foo://b/x.tar"]):
        assert "foo://b" in one_line_error(capsys, argv)
    # damaged metadata: the root's zarr.json cut short
    shutil.copytree(built, tmp_path / "cut.zarr")
    meta = tmp_path / "cut.zarr" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    for argv in (["info", str(tmp_path / "cut.zarr")], ["verify", str(tmp_path / "cut.zarr")]):
        assert "is damaged: its Zarr metadata does not read" in one_line_error(capsys, argv)
    # a damaged keys chunk: info still reports (keys' size assumed), verify names the damage
    shutil.copytree(built, tmp_path / "keys.zarr")
    chunk = next(p for p in (tmp_path / "keys.zarr" / "shards").glob("*/keys/c/**/*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:50])
    capsys.readouterr()
    assert main(["info", str(tmp_path / "keys.zarr")]) == 0
    assert main(["verify", str(tmp_path / "keys.zarr"), "--samples", "0"]) == 1
    assert "cannot decode" in capsys.readouterr().out


def test_a_boolean_flag_before_the_store_path_leaves_it_alone(built, capsys):
    """`kt-cache info --json STORE` (argparse's optional value took STORE for --json's value) reads as
    `info STORE --json`; `--json false` still takes its value."""
    capsys.readouterr()
    assert main(["info", "--json", str(built)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["info", str(built), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main(["info", "--json", "false", str(built)]) == 0
    assert not capsys.readouterr().out.lstrip().startswith("{")


def test_yaml_codec_and_view_spec_read_as_their_flags(tiny_teacher, fmnist, tmp_path, capsys):  # noqa: F811
    """`codec` in YAML (a list, or one string) splits as `--codec` does; a `view_spec` mapping is a spec; a spec
    value of the wrong type is one line."""
    import yaml

    data = fmnist["train"][0]
    for codec in (["logits=topk:k=5,patches=pca:d=16,int8"], "logits=topk:k=5,patches=pca:d=16,int8"):
        y = tmp_path / "c.yaml"
        y.write_text(yaml.safe_dump({"codec": codec, "view_spec": {"scale": [0.2, 1.0]}}))
        out = tmp_path / f"{type(codec).__name__}.zarr"
        assert main(build_args(tiny_teacher, data, out, "--config", str(y))) == 0
        attrs = CacheStore.open(out).attrs
        assert attrs["targets"]["logits"]["codec"] == "topk:k=5"
        assert attrs["targets"]["patches"]["codec"] == "pca:d=16,int8"
        assert attrs["view"]["spec"]["scale"] == [0.2, 1.0]
    capsys.readouterr()
    for spec, needle in (('{"hflip": "x"}', "hflip must be a number, got 'x'"),
                         ('{"scale": ["a", 1]}', "scale must be a number"), ('{"hflip": null}', "hflip must be")):
        assert needle in one_line_error(capsys, build_args(tiny_teacher, data, tmp_path / "v.zarr",
                                                           "--view-spec", spec))


def test_a_cut_shard_is_refused_and_the_build_resumes_once_it_is_restored(tiny_teacher, small_shards, tmp_path,
                                                                          capsys):  # noqa: F811
    """A shard cut short (a partial copy) stops the build with one line naming it; it is not marked complete,
    the shards before it are; restored, the rerun completes the store as an uninterrupted build would."""
    data = tmp_path / "data"
    data.mkdir()
    for url in small_shards:
        shutil.copy(url, data)
    cut = data / Path(small_shards[2]).name
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    argv = build_args(tiny_teacher, data, tmp_path / "c.zarr", "--fit-views", "16")  # fitted on the first shard
    line = one_line_error(capsys, argv)
    assert f"shard {cut} is damaged after" in line, line
    assert sorted(CacheStore.open(tmp_path / "c.zarr").completed()) == ["small-000000", "small-000001"]
    cut.write_bytes(whole)
    assert main(argv) == 0
    assert main(build_args(tiny_teacher, data, tmp_path / "ref.zarr", "--fit-views", "16")) == 0
    assert_same_store(tmp_path / "c.zarr", tmp_path / "ref.zarr")


def test_overwrite_replaces_a_cache_of_another_view_spec(tiny_teacher, small_shards, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "cache.zarr"
    assert main(build_args(tiny_teacher, small_shards[0], out, "--codec", "patches=fp16", views=1)) == 0
    argv = build_args(tiny_teacher, small_shards[0], out, "--codec", "patches=fp16", "--view-spec", "train", views=1)
    assert "view.spec" in one_line_error(capsys, argv)  # built with the default, light
    assert main(argv + ["--overwrite", "true"]) == 0
    assert CacheStore.open(str(out)).attrs["view"]["spec"]["randaug_ops"] == 2


# ------------------------------------------------------------------------------------ resume, ranks
@pytest.mark.parametrize("device_encode", ["off", "on"])
def test_killed_build_resumes_to_the_same_arrays(tiny_teacher, small_shards, tmp_path, device_encode):  # noqa: F811
    """Also with the patches encoded where the teacher runs (`--device-encode on`, the default on CUDA; the
    "device" is the CPU here): a resumed build writes what an uninterrupted one does, byte for byte."""
    argv = build_args(tiny_teacher, small_shards, tmp_path / "ref.zarr", "--batch-size", "4",
                      "--codec", "patches=pca:d=16,int8", "--device-encode", device_encode, views=3)
    single_thread_build(argv)
    out = tmp_path / "killed.zarr"
    argv[argv.index("--out") + 1] = str(out)
    cmd = [sys.executable, "-m", "kt.teacher_cache.cli", *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((out / "complete").glob("*/zarr.json")) if (out / "complete").exists() else True:
        assert proc.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.15))  # somewhere in a later shard
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = len(list((out / "complete").glob("*/zarr.json")))
    assert 1 <= complete <= len(small_shards)
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == complete and summary["shards_written"] == len(small_shards) - complete
    assert_same_store(tmp_path / "ref.zarr", out)


@pytest.mark.parametrize("device_encode", ["off", "on"])
def test_two_processes_build_the_same_store(tiny_teacher, small_shards, tmp_path, device_encode):  # noqa: F811
    argv = build_args(tiny_teacher, small_shards, tmp_path / "one.zarr", "--batch-size", "4",
                      "--codec", "patches=pca:d=16,int8", "--device-encode", device_encode, views=2)
    single_thread_build(argv)
    argv[argv.index("--out") + 1] = str(tmp_path / "two.zarr")
    # torchrun with gloo: `accelerate launch --num_processes 2 --cpu` starts one process without an MPI hostfile
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
           "-m", "kt.teacher_cache.cli", *argv]
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert sum(s["shards_written"] for s in summaries) == len(small_shards)
    ranks = {m["rank"] for m in CacheStore.open(str(tmp_path / "two.zarr")).completed().values()}
    assert ranks == {0, 1}
    assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")


def test_model_name_teacher_is_the_same_teacher_on_rerun():
    """A teacher given by name with random weights gets the same weights in every process (ranks, reruns)."""
    from kt.checkpoints import load_model, model_fingerprint

    torch.manual_seed(123)
    a = model_fingerprint(load_model("test_efficientnet", image_size=32, seed=0))
    torch.manual_seed(456)
    b = model_fingerprint(load_model("test_efficientnet", image_size=32, seed=0))
    assert a["weights_sha256"] == b["weights_sha256"]


def test_shard_with_only_bad_samples_completes_empty(tiny_teacher, corrupt_shard, tmp_path, capsys):  # noqa: F811
    """A shard in which nothing decodes is written as a complete, empty shard with its bad samples listed."""
    broken = write_shards([{"__key__": f"b{i}", "txt": b"not an image", "cls": b"0"} for i in range(3)],
                          tmp_path / "broken", prefix="broken")
    out = tmp_path / "c.zarr"
    assert main(build_args(tiny_teacher, [corrupt_shard[0], broken[0]], out, "--max-bad-fraction", "1.0",
                           "--codec", "patches=fp16", views=1)) == 0
    markers = CacheStore.open(str(out)).completed()
    empty = markers[shard_id_for(broken[0])]
    assert empty["n_samples"] == 0 and empty["n_bad"] == 3
    assert markers[shard_id_for(corrupt_shard[0])]["n_samples"] == 6


def test_default_patch_codec_is_chosen_on_the_fit_views(tiny_teacher, small_shards, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "auto.zarr"
    assert main(build_args(tiny_teacher, small_shards[:1], out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    store = CacheStore.open(str(out))
    attrs, _ = store.read_codec_state("patches")
    assert store.attrs["targets"]["patches"]["codec"] == "auto:cos=0.98"  # what was asked (resume compares it)
    assert summary["codecs"]["patches"] == attrs["spec"] != "auto:cos=0.98"  # what was chosen and stored
    selection = attrs["selection"]
    assert selection["requested"] == "auto:cos=0.98" and selection["tried"][-1]["codec"] == attrs["spec"]
    assert selection["fidelity"]["cosine_mean"] >= 0.98 or attrs["spec"] == "int8"
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["targets"]["patches"]
    assert info["chosen"] == attrs["spec"] and info["selection"] == selection
    assert main(["info", str(out)]) == 0
    assert f"auto:cos=0.98 -> {attrs['spec']} (held-out cosine mean" in capsys.readouterr().out
    # the reader decodes with the chosen codec; a rerun resumes the same cache
    from kt.teacher_cache.reader import CacheReader

    assert CacheReader(str(out)).codecs["patches"].spec == attrs["spec"]
    assert main(build_args(tiny_teacher, small_shards[:1], out)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_skipped"] == 1


def test_a_model_name_teacher_at_an_output_stride_caches_its_grid(tiny_teacher, small_shards, tmp_path, capsys):  # noqa: F811
    """`--output-stride 8` builds a named teacher as a segmentation backbone, so `patches` is its stride-8 grid (a
    segmentation student's task-agnostic target); verify reloads the same teacher and matches its fresh outputs."""
    from kt.teacher_cache.reader import CacheReader

    out = tmp_path / "grid.zarr"
    assert main(["build", "--teacher", "test_vit", "--output-stride", "8", "--image-size", "32", "--data",
                 small_shards[0], "--out", str(out), "--views", "1", "--targets", "patches", "--codec",
                 "patches=fp16", "--workers", "0"]) == 0
    reader = CacheReader(str(out))
    task = reader.attrs["task"]
    assert task["task"] == "segmentation" and task["output_stride"] == 8 and task["num_classes"] == 10
    assert list(reader.attrs["targets"]["patches"]["item_shape"][:2]) == task["grid"] == [4, 4]
    capsys.readouterr()
    assert main(["verify", str(out), "--samples", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fidelity"]["patches"]["cosine_min"] > 0.999
    assert "cache patches from it, not logits" in one_line_error(capsys, [
        "build", "--teacher", "test_vit", "--output-stride", "8", "--image-size", "32", "--data", small_shards[0],
        "--out", str(tmp_path / "x.zarr"), "--targets", "logits,patches", "--workers", "0"])
    assert "is a checkpoint and keeps its own" in one_line_error(capsys, [
        "build", "--teacher", tiny_teacher, "--output-stride", "8", "--data", small_shards[0],
        "--out", str(tmp_path / "y.zarr"), "--targets", "patches", "--workers", "0"])
