"""`--channels-last`: a speed knob only. Runs resume exactly, checkpoints stay plain row-major safetensors that load
anywhere, and a cache built with it holds the targets of a build without it (to float rounding)."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from kt.checkpoints import load_model
from kt.student.cli import main as student
from kt.teacher_cache.cli import main as cache
from tests.test_build_writers import _contents
from tests.test_finetune import finetune, weights
from tests.test_reader import build_args, tiny_teacher  # noqa: F401 -- the fixture, shared


def test_finetune_channels_last_resumes_exactly_and_saves_a_plain_checkpoint(fmnist, tmp_path, capsys):
    assert finetune(fmnist, tmp_path / "a", "--channels-last") == 0
    assert finetune(fmnist, tmp_path / "b", "--channels-last", "--stop-after-steps", "4") == 0
    assert finetune(fmnist, tmp_path / "b", "--channels-last") == 0
    assert "resuming at epoch 1, batch 1, step 4" in capsys.readouterr().out
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # the saved tensors are plain contiguous ones (a channels_last conv weight is not: safetensors refuses it)
    assert any(v.ndim == 4 and v.shape[-1] > 1 for v in a.values())
    assert all(v.is_contiguous() for v in load_file(str(tmp_path / "a" / "state" / "model.safetensors")).values())
    # the checkpoint computes the same function in either layout
    model = load_model(str(tmp_path / "a"), what="test").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        fast = model.to(memory_format=torch.channels_last)(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    # the same optimisation: the first step (same weights, same batch) has the plain run's loss to float rounding
    # (later steps drift apart: Adam normalises away the scale of near-zero gradient differences)
    assert finetune(fmnist, tmp_path / "c") == 0
    first = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[0])["loss"] for r in "ac"]
    assert abs(first[0] - first[1]) < 1e-5


def test_eval_channels_last_gives_the_same_metrics(fmnist, tmp_path, capsys):
    assert finetune(fmnist, tmp_path / "a") == 0
    capsys.readouterr()
    results = []
    for extra in ([], ["--channels-last"]):
        assert student(["eval", "--checkpoint", str(tmp_path / "a"), "--data", str(fmnist["root"] / "test"),
                        "--workers", "0", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["n"] == results[1]["n"] == 100
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]


def test_build_channels_last_caches_the_same_targets(tiny_teacher, fmnist, tmp_path):  # noqa: F811
    stores = {}
    for name, extra in (("plain", []), ("cl", ["--channels-last"])):
        out = tmp_path / f"{name}.zarr"
        assert cache(build_args(tiny_teacher, fmnist["train"][:1], out, *extra, "--targets", "logits,embedding",
                                "--codec", "logits=fp16",
                                "--codec", "embedding=fp16", views=1)) == 0
        stores[name] = _contents(str(out))
    plain, cl = stores["plain"], stores["cl"]
    assert sorted(plain) == sorted(cl) and plain
    for shard_id in plain:
        assert plain[shard_id]["keys"] == cl[shard_id]["keys"]
        np.testing.assert_array_equal(plain[shard_id]["params"], cl[shard_id]["params"])
        for t, parts in plain[shard_id]["targets"].items():
            for part, value in parts.items():
                np.testing.assert_allclose(np.asarray(cl[shard_id]["targets"][t][part], np.float32),
                                           np.asarray(value, np.float32), rtol=1e-2, atol=2e-3, err_msg=t)


def test_channels_last_benchmark_measures_both_layouts():
    from tools import bench_channels_last
    from tools.bench import _parse

    args = _parse(bench_channels_last, ["--models", "test_efficientnet@32", "test_vit@32/8", "--train-batch", "4",
                                        "--infer-batch", "4", "--steps", "1", "--repeats", "1", "--threads", "1"])
    result = bench_channels_last.run(args)
    assert [m["model"] for m in result["models"]] == ["test_efficientnet@32", "test_vit@32/8"]
    for m in result["models"]:
        for part in ("train_img_s", "infer_img_s"):
            v = m[part]
            assert v["nchw"] > 0 and v["channels_last"] > 0
            assert abs(v["ratio"] - v["channels_last"] / v["nchw"]) < 0.01
