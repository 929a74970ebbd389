"""Device students on CPU: latency per image (batch 1) under onnxruntime vs torch eager.

    python -m tools.bench export --json
    python -m tools.bench export --json --image-size 256 --threads 2 --students fastvit_s12,mobilevitv2_050

Each student is built with random weights and a 10-class head, put in its inference form and exported
exactly as `kt-student export` does (`kt.student.export`: timm's `reparameterize_model`, torch's ONNX
exporter, weights in the file). Both runtimes get the same thread count and the same inputs; after
warm-up the two alternate in rounds so that machine noise hits both, and the median per-image time of
each is reported (`ort_over_torch` < 1: onnxruntime is faster). `torch_eager_train_form_ms` is the model
before re-parameterisation, as training and `kt-student eval` run it (differs for FastViT only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STUDENTS = ("mobilevitv2_050", "fastvit_s12", "tf_efficientnet_lite0", "resnet10t")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench export", description=__doc__.splitlines()[0])
    p.add_argument("--students", default=",".join(STUDENTS), help="timm names, comma-separated")
    p.add_argument("--image-size", type=int, default=224, help="input size of the exported students")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both runtimes (a device core or two)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of timed runs per runtime")
    p.add_argument("--per-round", type=int, default=10, help="timed single-image runs per runtime per round")
    p.add_argument("--opset", type=int, default=18)
    return p


def run(args) -> dict:
    from kt.models import create_model
    from kt.student.export import export_onnx, inference_form

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in [s for s in args.students.split(",") if s]:
            torch.manual_seed(0)
            model = create_model(name, num_classes=10, image_size=args.image_size).eval()
            deployable = inference_form(model)
            path = Path(work) / f"{name}.onnx"
            start = time.perf_counter()
            export_onnx(deployable, path, args.image_size, args.opset, dynamic_batch=False)
            export_s = time.perf_counter() - start
            results[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                             "onnx_bytes": path.stat().st_size, "export_s": export_s,
                             **_latencies(model, deployable, path, args)}
    return {"image_size": args.image_size, "threads": args.threads, "batch": 1,
            "torch": torch.__version__, "onnxruntime": _ort_version(), "students": results}


def _latencies(model, deployable, path: Path, args) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, args.image_size, args.image_size), dtype=np.float32) for _ in range(4)]
    ts = [torch.from_numpy(x) for x in xs]

    def run_ort(i):
        return session.run(None, {"image": xs[i % len(xs)]})[0]

    def run_torch(i, m=deployable):
        with torch.inference_mode():
            return m(ts[i % len(ts)])

    def run_train_form(i):
        return run_torch(i, model)

    parity = max(float(np.abs(run_ort(i) - run_torch(i).numpy()).max()) for i in range(len(xs)))
    modes = {"onnxruntime_ms": run_ort, "torch_eager_ms": run_torch}
    if deployable is not model:
        modes["torch_eager_train_form_ms"] = run_train_form
    times = {k: [] for k in modes}
    for fn in modes.values():  # warm-up: allocator, kernels, onnxruntime's first-run graph work
        for i in range(3):
            fn(i)
    for _ in range(args.rounds):
        for key, fn in modes.items():
            for i in range(args.per_round):
                start = time.perf_counter()
                fn(i)
                times[key].append((time.perf_counter() - start) * 1e3)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ort_over_torch"] = out["onnxruntime_ms"] / out["torch_eager_ms"]
    out["parity_max_abs_diff"] = parity
    return out


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
