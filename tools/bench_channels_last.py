"""What `--channels-last` buys: images/s of a training step and of inference, NCHW weights vs channels_last, per model.

    python -m tools.bench channels-last --json
    python -m tools.bench channels-last --models tf_efficientnet_lite0@32 mobilevitv2_050@64/8 --threads 2 --json

Each model is `NAME@SIZE` (classification) or `NAME@SIZE/8` (segmentation at output stride 8, DeepLabV3 head 128
wide), built by kt's own `create_model` with random weights. Per model and layout: the median over `--repeats`
timed blocks, the two layouts alternating so that a change in machine load falls on both; `ratio` is channels_last
over NCHW images/s. Training is forward + backward + AdamW on a fixed batch (the step of `kt-student finetune` /
`train`); inference is a forward under `inference_mode` (eval, `kt-cache build`'s teacher).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

DEFAULT_MODELS = ["tf_efficientnet_lite0@32", "tf_efficientnet_lite2@64", "mobilevitv2_050@32", "fastvit_s12@32",
                  "mobilevitv2_050@64/8", "tf_efficientnet_lite0@64/8"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench channels-last", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME@SIZE[/8]")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--infer-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="steps (or forwards) per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per layout (median)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p


def _model(spec: str, channels_last: bool):
    from kt.device import set_channels_last
    from kt.models import create_model

    name, _, rest = spec.partition("@")
    size, _, stride = rest.partition("/")
    torch.manual_seed(0)
    seg = dict(task="segmentation", output_stride=int(stride), head_width=128) if stride else {}
    model = create_model(name, num_classes=10, image_size=int(size), **seg)
    return set_channels_last(model, channels_last), int(size)


def _train_block(model, x, y, opt, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        out = model(x)
        loss = F.cross_entropy(out, y) if out.ndim == 2 else F.cross_entropy(out, y[:, None, None].expand(
            -1, *out.shape[2:]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * x.shape[0] / (time.perf_counter() - start)


def _infer_block(model, x, steps: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            model(x)
    return steps * x.shape[0] / (time.perf_counter() - start)


def measure(spec: str, args) -> dict:
    models = {cl: _model(spec, cl) for cl in (False, True)}
    size = models[False][1]
    x_train = torch.randn(args.train_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(args.train_batch) % 10
    x_infer = torch.randn(args.infer_batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    opts = {cl: torch.optim.AdamW(m.parameters(), lr=1e-4) for cl, (m, _) in models.items()}
    train = {False: [], True: []}
    infer = {False: [], True: []}
    for cl, (m, _) in models.items():  # warm-up: allocator, kernel choice, Adam state
        _train_block(m.train(), x_train, y, opts[cl], 1)
        _infer_block(m.eval(), x_infer, 1)
    for _ in range(args.repeats):
        for cl, (m, _) in models.items():
            train[cl].append(_train_block(m.train(), x_train, y, opts[cl], args.steps))
            infer[cl].append(_infer_block(m.eval(), x_infer, args.steps))
    med = {k: {cl: statistics.median(v[cl]) for cl in v} for k, v in (("train", train), ("infer", infer))}
    return {"model": spec,
            **{f"{k}_img_s": {"nchw": round(v[False], 1), "channels_last": round(v[True], 1),
                              "ratio": round(v[True] / v[False], 2)} for k, v in med.items()}}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    return {"threads": args.threads, "train_batch": args.train_batch, "infer_batch": args.infer_batch,
            "models": [measure(spec, args) for spec in args.models]}
