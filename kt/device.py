"""Device placement, decided once for every stage: where inputs go, pinned host memory, teacher precision.

Every forward pass in kt runs on the device of the model's parameters, and its inputs are moved there, never
the other way round: under `accelerate` the model is placed by `prepare` (its own GPU per process), and
evaluation, the online teacher, the cache build and the retrieval embed all run on whatever device that is.

From that device, `placement` derives the rest:
- pin_memory: DataLoaders pin their batches when the consumer is a CUDA device, so that the host->device
  copy can be asynchronous (`non_blocking=True`) and overlap the previous step's kernels. For a CPU
  consumer pinning would only add a copy (and needs CUDA at all), so it is off.
- teacher precision: teacher forwards (kt-cache build, the online teacher of `kt-student train`, the
  retrieval embed) run under bf16 autocast on CUDA: the teacher is the expensive model, only read, and
  bf16 keeps fp32's exponent range (no overflow, no loss scaling). What it costs in fidelity against fp32
  on the same views is measured by `python -m tools.bench gpu` (docs/benchmarks.md); `fp32` turns it off.
  On CPU teachers always run in fp32: CPU bf16 autocast is slower than fp32 on most CPUs, and the
  equivalence tests (cached target == fresh CPU forward) stay exact.
Students are never autocast here: their precision is accelerate's `--mixed-precision`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kt.errors import UserError

# When a loop's closing line names what limited it (the build's `bottleneck`, training's `LoaderClock`): a part
# that took more than BOUND_SHARE of the loop after its first batch, in a loop of at least BOUND_MIN_S seconds
# (shorter ones are mostly start-up)
BOUND_SHARE = 0.25
BOUND_MIN_S = 20.0

# teacher precision name -> autocast dtype on CUDA (None: no autocast, full fp32)
TEACHER_PRECISIONS: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp32": None}

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    """How tensors reach `device` and at which precision a teacher runs there."""

    device: torch.device
    pin_memory: bool  # DataLoaders feeding this device pin their batches
    non_blocking: bool  # host->device copies are asynchronous (only meaningful from pinned memory)
    teacher_dtype: torch.dtype | None  # autocast dtype of teacher forwards; None: fp32

    def to(self, obj: Any) -> Any:
        """`obj` (a tensor, or dicts / lists / tuples of them; anything else unchanged) on this device."""
        return to_device(obj, self.device, self.non_blocking)

    def teacher_autocast(self):
        """The context for a teacher forward: bf16 autocast on CUDA, or explicitly none, so that an
        enclosing autocast (accelerate's `--mixed-precision` around the student) does not leak into an
        fp32 teacher either."""
        if self.device.type not in ("cuda", "cpu"):  # meta & co: nothing to autocast
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.teacher_dtype or torch.bfloat16,
                              enabled=self.teacher_dtype is not None)


def check_precision(name: str, what: str = "--teacher-precision") -> torch.dtype | None:
    if name not in TEACHER_PRECISIONS:
        raise UserError(f"unknown {what} {name!r}; choose from {', '.join(TEACHER_PRECISIONS)}")
    return TEACHER_PRECISIONS[name]


def placement(device: str | torch.device, teacher_precision: str = "bf16") -> Placement:
    """The placement policy for a model living on `device` (see the module docstring)."""
    device = torch.device(device)
    dtype = check_precision(teacher_precision)
    cuda = device.type == "cuda"
    return Placement(device=device, pin_memory=cuda, non_blocking=cuda, teacher_dtype=dtype if cuda else None)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when present (and not turned off with ACCELERATE_USE_CPU), else CPU; `cuda` without
    CUDA is a user error, not a traceback deep inside the first forward."""
    from kt.config import accelerate_cpu

    if name not in DEVICES and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}; choose from {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cpu" if accelerate_cpu() else "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but this machine has no CUDA device (use --device cpu)")
    return torch.device(name)


CHANNELS_LAST_HELP = ("channels_last (NHWC) weights and activations: on CPU 1.8-4x faster for depthwise-conv "
                      "networks (EfficientNet-Lite, FastViT) at small sizes, the usual format for convnets under "
                      "AMP on GPUs; a speed knob that changes results only in the last float bits "
                      "(docs/benchmarks.md). Off by default so recorded runs rerun bit-for-bit")


def set_channels_last(model: nn.Module, on: bool) -> nn.Module:
    """Move `model`'s 4-d weights to channels_last when `on` (then convolutions keep activations NHWC: the
    input's layout is converted by the first one). Saved weights stay plain contiguous tensors
    (`kt.weights.write_safetensors`), so checkpoints do not depend on it."""
    if on:
        model.to(memory_format=torch.channels_last)
    return model


def model_device(model: nn.Module) -> torch.device:
    """Where a model's parameters live (CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(torch.is_tensor(v) or isinstance(v, (dict, list, tuple)) for v in obj):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


# glibc's malloc gives a freed block back to the OS at once when it was mmapped (above the mmap threshold, which
# grows to at most 32 MiB) or when the heap's free top exceeds the trim threshold. A CPU forward frees its
# activations and allocates them again every batch, so each batch faulted every page of them in afresh: 1.2-2.3M
# minor page faults in the 4,000-view Lite2 build benchmark, 40-90K with the settings below
# (docs/benchmarks.md). PyTorch's tuning guide swaps the allocator instead (jemalloc or tcmalloc by LD_PRELOAD),
# which a running process cannot do and which is not a Python package; mallopt is glibc's own switch for it.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # <malloc.h>
_MALLOC_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
_malloc_kept = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (no mmapped blocks; the heap's top kept up
    to 1 GiB): the process's footprint stays at its peak, and repeated large allocations stop page-faulting.
    Process-wide, so only long-running stages call it (`kt-cache build`); DataLoader workers forked later
    inherit it. True where applied; False off glibc (macOS, musl), where nothing changes."""
    global _malloc_kept
    if _malloc_kept:
        return True
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_kept = all(mallopt(option, value) == 1 for option, value in _MALLOC_SETTINGS)
    return _malloc_kept
