"""Bad input found by trying: every numeric config field has a declared range that every command checks, the
inputs that used to end in a traceback (or "complete" doing nothing) are one line and exit 2, and two writers
of one cache store are refused."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

import kt
from kt.config import _base_type, check_config, valid_range
from kt.errors import UserError
from tests.test_reader import build_args, tiny_teacher  # noqa: F401 -- the fixture

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("student", "teacher_cache", "retrieval")


def config_classes() -> list[type]:
    """Every dataclass declared in kt's packages whose fields come from `kt.config.field` or whose name ends
    in Config."""
    found = {}
    names = [m.name for m in pkgutil.iter_modules(kt.__path__[:1], "kt.")]
    for stage in STAGES:
        package = importlib.import_module(f"kt.{stage}")
        names += [m.name for m in pkgutil.iter_modules(package.__path__, f"kt.{stage}.")]
    for name in names:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if not (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == name):
                continue
            fields = dataclasses.fields(obj)
            if obj.__name__.endswith("Config") or any("help" in f.metadata for f in fields):
                found[f"{obj.__module__}.{obj.__name__}"] = obj
    return [found[k] for k in sorted(found)]


def test_every_numeric_config_field_declares_its_range():
    classes = config_classes()
    names = {c.__name__ for c in classes}
    assert {"OptimConfig", "FinetuneConfig", "DistillConfig", "BuildConfig"} <= names, names
    missing = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            base = _base_type(hints[f.name])
            if base in (int, float) and not valid_range(f):
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"numeric config fields without a range: {missing}"


def test_check_config_names_the_flag_and_its_range():
    from kt.student.distill import DistillConfig
    from kt.student.finetune import FinetuneConfig

    check_config(FinetuneConfig())  # every default is valid
    with pytest.raises(UserError, match=r"--epochs -1: must be >= 1"):
        check_config(FinetuneConfig(epochs=-1))
    with pytest.raises(UserError, match=r"--mixed-precision 'fp8': must be one of no, fp16, bf16"):
        check_config(FinetuneConfig(mixed_precision="fp8"))
    with pytest.raises(UserError, match=r"--lr -0.1: must be >= 0"):
        check_config(FinetuneConfig(lr=-0.1))
    with pytest.raises(UserError, match=r"--temperature 0: must be > 0"):
        check_config(DistillConfig(temperature=0))
    with pytest.raises(UserError, match=r"--min-lr-ratio nan"):
        check_config(FinetuneConfig(min_lr_ratio=float("nan")))
    check_config(FinetuneConfig(labels_per_class=None))  # None means "all" where the type allows it


def one_line(capsys, main, argv, prog: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if "\r" not in line and line.strip()]  # minus progress bars
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


def test_the_list_from_trying(fmnist, tiny_teacher, tmp_path, capsys):  # noqa: F811
    from kt.retrieval.cli import main as retrieve
    from kt.student.cli import main as student
    from kt.teacher_cache.cli import main as cache

    data = str(fmnist["root"] / "train")
    ft = ["finetune", "--data", data, "--model", "test_efficientnet", "--image-size", "32", "--workers", "0",
          "--out", str(tmp_path / "ft")]
    assert "--image-size -3: must be >= 0" in one_line(
        capsys, cache, build_args(tiny_teacher, data, tmp_path / "c.zarr", "--image-size", "-3"), "kt-cache")
    assert "--labels-per-class 0: must be >= 1" in one_line(capsys, student, ft + ["--labels-per-class", "0"],
                                                            "kt-student")
    assert "--epochs -1: must be >= 1" in one_line(capsys, student, ft + ["--epochs", "-1"], "kt-student")
    assert "--grad-accum 0" in one_line(capsys, student, ["train", "--cache", "x", "--data", data, "--out",
                                                          str(tmp_path / "d"), "--grad-accum", "0"], "kt-student")
    # a YAML config is checked the same way as flags
    (tmp_path / "c.yaml").write_text("batch_size: 0\n")
    assert "--batch-size 0: must be >= 1" in one_line(capsys, student, ft + ["--config", str(tmp_path / "c.yaml")],
                                                       "kt-student")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "c.zarr").exists()

    vectors = np.ones((4, 8), np.float32)
    vectors[2, 5] = np.nan
    np.save(tmp_path / "e.npy", vectors)
    (tmp_path / "k.txt").write_text("a\nb\nc\nd\n")
    err = one_line(capsys, retrieve, ["import", "--embeddings", str(tmp_path / "e.npy"), "--keys",
                                      str(tmp_path / "k.txt"), "--encoder", "enc", "--out", str(tmp_path / "e.emb")],
                   "kt-retrieve")
    assert "1 rows hold NaN or infinite values, e.g. row 2 (key 'c')" in err
    assert not (tmp_path / "e.emb").exists()

    # a top-k codec for more classes than the teacher has: refused before the store exists (was: at the first batch)
    err = one_line(capsys, cache, build_args(tiny_teacher, data, tmp_path / "k.zarr", "--codec", "logits=topk:k=50"),
                   "kt-cache")
    assert "--codec logits=topk:k=50: k=50 is more than the teacher's 10 classes" in err
    assert not (tmp_path / "k.zarr").exists()


# ------------------------------------------------------------------------------------------ two writers
HOLD = """
import sys
from kt.teacher_cache.lock import StoreLock
lock = StoreLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()  # hold until the test closes our stdin (or kills us)
lock.release()
"""


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(fmnist, tiny_teacher, tmp_path,  # noqa: F811
                                                                        capsys):
    from kt.teacher_cache.cli import main as cache

    out = tmp_path / "c.zarr"
    argv = build_args(tiny_teacher, fmnist["train"][0], out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = json.loads(Path(str(out) + ".lock").read_text())
        assert lock["pid"] == holder.pid
        err = one_line(capsys, cache, argv, "kt-cache")
        assert f"is being written by another build (pid {holder.pid} on {lock['host']}" in err
        assert not out.exists()  # the refused build touched nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and the next build takes it over
    assert Path(str(out) + ".lock").exists()
    assert cache(argv) == 0
    assert not Path(str(out) + ".lock").exists()  # released at the end
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_written"] == 1


@pytest.mark.slow
def test_two_concurrent_builds_one_wins(fmnist, tiny_teacher, tmp_path):  # noqa: F811
    """Two real `kt-cache build` processes into one store at once: each either builds or is refused with one
    line and exit 2 (never a zarr traceback), and the store ends complete."""
    out = tmp_path / "c.zarr"
    argv = [sys.executable, "-m", "kt.teacher_cache.cli", *build_args(tiny_teacher, fmnist["train"], out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            assert "is being written by another build" in err
    from kt.teacher_cache.store import CacheStore

    assert len(CacheStore.open(str(out)).completed()) == len(fmnist["train"])
