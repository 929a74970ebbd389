"""Device placement on a CPU-only machine: the policy (kt.device), inputs reaching the model's device in
evaluation, and the online teacher's precision. The same paths on a real GPU: tests/test_gpu.py."""

import json

import pytest
import torch
from torch import nn

from kt.device import Placement, placement, resolve_device, to_device
from kt.errors import UserError


def test_policy_follows_the_device():
    cuda = placement("cuda:0")
    assert cuda.pin_memory and cuda.non_blocking and cuda.teacher_dtype is torch.bfloat16
    assert placement(torch.device("cuda"), "fp32").teacher_dtype is None
    cpu = placement("cpu")  # no pinning (needs CUDA, only adds a copy) and teachers in fp32
    assert not cpu.pin_memory and not cpu.non_blocking and cpu.teacher_dtype is None
    with pytest.raises(UserError, match="choose from bf16, fp32"):
        placement("cuda", "fp16")


def test_teacher_autocast_is_bf16_or_explicitly_none():
    """fp32 means fp32 even inside an enclosing autocast (accelerate's --mixed-precision around the student)."""
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    forced = Placement(torch.device("cpu"), False, False, torch.bfloat16)  # what CUDA gets, on CPU
    with forced.teacher_autocast():
        assert (x @ w).dtype is torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), placement("cpu").teacher_autocast():
        assert (x @ w).dtype is torch.float32
    meta = placement("meta")
    with meta.teacher_autocast():
        assert (x @ w).dtype is torch.float32


def test_to_device_moves_nested_batches_and_keeps_the_rest():
    batch = {"x": torch.ones(2), "keys": ["a", "b"], "targets": {"logits": torch.zeros(2, 3)}, "n": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta" and moved["targets"]["logits"].device.type == "meta"
    assert moved["keys"] == ["a", "b"] and moved["n"] == 3


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


class OffHostClassifier(nn.Module):
    """Weights on 'meta', standing in for a model that accelerate left on a GPU: an input still on the CPU
    fails as it does against CUDA weights (meta tensors skip that check, so it is made here)."""

    arch, num_classes, image_size, mean, std = "off-host", 10, 16, (0.5,) * 3, (0.5,) * 3

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(10, 3, device="meta"))

    def forward(self, x):
        if x.device != self.weight.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found {x.device} and "
                               f"{self.weight.device}")
        return torch.zeros(len(x), 10)  # meta tensors hold no values: predict class 0 for everything


def test_evaluate_sends_inputs_to_the_models_device(fmnist):
    """`kt-student finetune --val-data` evaluates the model where accelerate put it (a crash on CUDA before)."""
    from kt.shards import iter_samples
    from kt.student.evaluate import evaluate

    metrics = evaluate(OffHostClassifier(), fmnist["test"], batch_size=32, workers=0)
    labels = [s.label for s in iter_samples(fmnist["test"])]
    assert metrics["n"] == 100
    assert metrics["top1"] == pytest.approx(labels.count(0) / 100)


def test_eval_refuses_a_device_it_does_not_have(fmnist, tmp_path, capsys):
    from kt.student.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path), "--data", fmnist["test"][0], "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_online_teacher_keeps_its_precision_under_mixed_precision():
    """An fp32 online teacher inside accelerate's bf16 autocast still gives fp32 targets (it gave bf16 ones)."""
    from kt.models import create_model
    from kt.student.distill import Distiller
    from kt.student.losses import create_objective

    torch.manual_seed(0)
    teacher = create_model("test_vit", num_classes=5, image_size=32).eval()
    student = create_model("test_efficientnet", num_classes=5, image_size=32)
    objective = create_objective("task", {"embedding": student.embedding_dim, "grid": student.grid_dim,
                                          "num_classes": 5},
                                 {"num_classes": 5, "embedding": teacher.embedding_dim, "patches": teacher.grid_dim})
    seen = {}

    def record(targets_fn):
        def wrapped(out, targets):
            seen.update(targets)
            return targets_fn(out, targets)
        return wrapped

    model = Distiller(student, objective, teacher, teacher_precision="fp32")
    model.objective.forward = record(model.objective.forward)
    batch = {"x": torch.randn(4, 3, 32, 32), "teacher_x": torch.randn(4, 3, 32, 32)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(batch)
    with torch.no_grad():
        reference = teacher(batch["teacher_x"])
    assert seen["logits"].dtype is torch.float32
    assert torch.equal(seen["logits"], reference)
    assert torch.isfinite(loss)


def test_build_summary_names_the_device_and_precision(fmnist, tmp_path):
    from kt.teacher_cache.build import BuildConfig, build_cache

    summary = build_cache(BuildConfig(teacher="test_vit", data=fmnist["test"][0], out=str(tmp_path / "c.zarr"),
                                      views=1, targets=["embedding"], image_size=32, batch_size=50, workers=0))
    assert summary["device"] == "cpu" and summary["teacher_dtype"] == "float32"
    with pytest.raises(UserError, match="choose from bf16, fp32"):
        build_cache(BuildConfig(teacher="test_vit", data=fmnist["test"][0], out=str(tmp_path / "d.zarr"),
                                targets=["embedding"], teacher_precision="half"))
    json.dumps(summary)


_FAULTS = """
import resource, sys
import numpy as np
from kt.device import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported"); sys.exit()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(8 << 20)  # 64 MiB: above glibc's largest mmap threshold; the first allocation faults in either case
start = faults()
for _ in range(8):
    np.ones(8 << 20)  # allocated, filled, freed: a forward's activations, batch after batch
print(faults() - start)
"""


@pytest.mark.parametrize("mode", ["default", "keep"])
def test_kept_freed_memory_stops_page_faults_of_repeated_allocations(mode):
    """`keep_freed_memory` (glibc's mallopt): 8 fresh 64 MiB allocations fault their pages in each time by
    default (16K 4 KiB pages each, or 32 huge ones at least) and almost none once freed memory is kept. In a
    subprocess: the setting is process-wide."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True).stdout
    if out.strip() == "unsupported":
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    huge_pages = 8 * (64 << 20) // (2 << 20)  # a fault per 2 MiB at least, where transparent huge pages are on
    if mode == "default":
        assert int(out) >= huge_pages
    else:
        assert int(out) < huge_pages // 16


def test_build_keeps_freed_memory(fmnist, tmp_path, monkeypatch):
    import kt.teacher_cache.build as build

    calls = []
    monkeypatch.setattr(build, "keep_freed_memory", lambda: calls.append(1) or True)
    build.build_cache(build.BuildConfig(teacher="test_vit", data=fmnist["test"][0], out=str(tmp_path / "c.zarr"),
                                        views=1, targets=["embedding"], image_size=32, batch_size=50, workers=0))
    assert calls == [1]
