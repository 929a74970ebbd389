"""kt.student.dataset.CacheDataset: the batches `kt-student train` trains on, for a loop of one's own.

The reference is the command itself: the batches its training step receives (recorded in `Distiller.forward`)
must be the dataset's, key for key and bit for bit, for the same seed, epochs and worker layout; across two
processes, each takes its own samples (`tests/two_rank_dataset.py` checks both under a real launcher).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kt.errors import UserError
from kt.models import create_model
from kt.student.cli import main
from kt.student.dataset import CacheDataset
from kt.teacher_cache.build import BuildConfig, build_cache
from tests.test_reader import tiny_teacher  # noqa: F401 -- the fixture

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(fmnist, tiny_teacher, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    build_cache(BuildConfig(teacher=tiny_teacher, data=str(fmnist["root"] / "train"), out=str(out), views=2,
                            targets=["logits", "embedding"], image_size=32, batch_size=50, workers=0,
                            codec=["logits=fp16", "embedding=fp16"]))
    return out


def dataset(fmnist, cache, **kw) -> CacheDataset:
    student = create_model("test_vit", image_size=32)
    args = dict(image_size=32, mean=student.mean, std=student.std, targets=["logits"], batch_size=32)
    return CacheDataset(str(cache), str(fmnist["root"] / "train"), **{**args, **kw})


def epoch_batches(data: CacheDataset, epoch: int, skip: int = 0) -> list[dict]:
    data.set_epoch(epoch, skip)
    return list(data.loader())


def test_batches_equal_what_kt_student_train_consumes(fmnist, cache, tmp_path, monkeypatch):
    """Two epochs, two DataLoader workers, one shard per group (both workers read): every batch the training
    step of `kt-student train` received is the dataset's, views and targets bit for bit."""
    from kt.student import distill

    consumed = []
    forward = distill.Distiller.forward

    def recording(self, batch):
        consumed.append({"keys": list(batch["keys"]), "views": batch["views"].clone(), "x": batch["x"].clone(),
                         "logits": batch["targets"]["logits"].clone()})
        return forward(self, batch)

    monkeypatch.setattr(distill.Distiller, "forward", recording)
    assert main(["train", "--model", "test_vit", "--cache", str(cache), "--data", str(fmnist["root"] / "train"),
                 "--image-size", "32", "--batch-size", "32", "--epochs", "2", "--workers", "2",
                 "--shuffle-shards", "1", "--seed", "5", "--objective", "task", "--out", str(tmp_path / "run")]) == 0

    data = dataset(fmnist, cache, workers=2, shuffle_shards=1, seed=5)
    ours = []
    for epoch in range(2):
        batches = epoch_batches(data, epoch)
        assert len(batches) == len(data)
        ours += batches
    assert [b["keys"] for b in ours] == [c["keys"] for c in consumed]
    assert len({k for b in ours for k in b["keys"]}) == 300
    for b, c in zip(ours, consumed):
        assert torch.equal(b["views"], c["views"])
        assert torch.equal(b["x"], c["x"]) and b["x"].dtype == torch.float32
        assert torch.equal(b["targets"]["logits"], c["logits"])
    # a resumed epoch starts at its batch k, as the command's resume does
    assert [b["keys"] for b in epoch_batches(data, 1, skip=3)] == [b["keys"] for b in ours[len(ours) // 2 + 3:]]


def test_processes_take_disjoint_samples_in_equal_steps(fmnist, cache, monkeypatch):
    """Ranks from the arguments or, as torchrun sets them, from RANK / WORLD_SIZE: each rank's own shards, the
    same number of batches on each (3 shards over 2 ranks: the rank with two is cut to the other's count)."""
    seen, steps = [], []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        data = dataset(fmnist, cache, batch_size=16, shuffle_shards=1)
        assert (data.spec.rank, data.spec.world_size) == (rank, 2)
        batches = epoch_batches(data, 0)
        steps.append(len(batches))
        seen.append([k for b in batches for k in b["keys"]])
        assert len(batches) == len(data)
    assert steps[0] == steps[1] == 7  # 100 samples in batches of 16 on the rank with one shard
    assert not set(seen[0]) & set(seen[1])
    # the rank with two shards takes 7 full batches of its 200 samples, the other all 100 (its last batch holds 4)
    assert sorted(len(set(s)) for s in seen) == sorted(len(s) for s in seen) == [100, 112]
    assert dataset(fmnist, cache, rank=0, world_size=1).spec.world_size == 1  # arguments win over the environment


def test_refusals_are_one_line_user_errors(fmnist, cache, tmp_path):
    data = dataset(fmnist, cache, workers=2)
    with pytest.raises(UserError, match="planned for 2 DataLoader workers and is read by 0"):
        next(iter(data))
    with pytest.raises(UserError, match=r"needs cached patches; the cache holds logits, embedding"):
        dataset(fmnist, cache, targets=["patches"])
    with pytest.raises(UserError, match="rank 2 is not a process of a world of 2"):
        dataset(fmnist, cache, rank=2, world_size=2)
    with pytest.raises(UserError, match="classes"):
        dataset(fmnist, cache, expect={"classes": [f"other{i}" for i in range(10)]})
    with pytest.raises(UserError, match="is incomplete: 1 of 1 input shards not built"):  # other data
        CacheDataset(str(cache), fmnist["test"][0], image_size=32)
    with pytest.raises(UserError, match="unknown view_policy"):
        dataset(fmnist, cache, view_policy="last")


def load_example():
    spec = importlib.util.spec_from_file_location("own_loop", ROOT / "examples" / "own_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_loop_example_distills_a_timm_model(fmnist, cache, tmp_path, capsys):
    """examples/own_loop.py: every planned batch of every epoch, the KL falls, the file is the timm model's."""
    import timm
    from safetensors.torch import load_file

    out = tmp_path / "student.safetensors"
    summary = load_example().main(["--cache", str(cache), "--data", str(fmnist["root"] / "train"),
                                   "--model", "test_efficientnet", "--image-size", "32", "--batch-size", "32",
                                   "--epochs", "3", "--lr", "0.003", "--workers", "0", "--out", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 30  # the line it prints
    per_epoch = len(dataset(fmnist, cache))
    assert summary["steps"] == 3 * per_epoch == 30
    first, last = summary["losses"][:per_epoch], summary["losses"][-per_epoch:]
    print("mean KL, first epoch:", sum(first) / per_epoch, "last epoch:", sum(last) / per_epoch)
    assert sum(last) < 0.7 * sum(first)
    timm.create_model("test_efficientnet", num_classes=10).load_state_dict(load_file(str(out)))


@pytest.mark.slow
def test_two_processes_take_what_two_process_training_takes(fmnist, cache, tmp_path):
    """Under `accelerate launch` (2 processes, gloo): each rank's dataset, with rank and world size from the
    process group, yields the batches that rank's `kt-student train` step received; the ranks are disjoint."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "tests/two_rank_dataset.py", str(cache), str(fmnist["root"] / "train"), str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True, cwd=ROOT)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert got["world_size"] == 2 and [b for e in got["epochs"] for b in e] == got["train"]
    for epoch in range(2):
        keys = [{k for b in got["epochs"][epoch] for k in b} for got in ranks]
        assert keys[0] and keys[1] and not keys[0] & keys[1]
        assert len(ranks[0]["epochs"][epoch]) == len(ranks[1]["epochs"][epoch])


@pytest.mark.slow
def test_own_loop_example_under_torchrun(fmnist, cache, tmp_path):
    """The example as a user runs it on several GPUs, here 2 CPU processes on gloo: equal steps, one file."""
    out = tmp_path / "student.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "examples/own_loop.py",
           "--cache", str(cache), "--data", str(fmnist["root"] / "train"), "--model", "test_efficientnet",
           "--image-size", "32", "--batch-size", "16", "--epochs", "1", "--workers", "0", "--out", str(out)]
    done = subprocess.run(cmd, check=True, timeout=600, capture_output=True, text=True, cwd=ROOT)
    lines = sorted((json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")), key=lambda s: s["rank"])
    assert [(s["rank"], s["processes"], s["steps"]) for s in lines] == [(0, 2, 7), (1, 2, 7)]
    assert out.exists()
