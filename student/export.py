"""Export a model for the device: ONNX, checked against torch under onnxruntime before it is kept.

    kt-student export --checkpoint runs/student --format onnx --out student.onnx \
        --data data/fashion-mnist/test [--image-size 64] [--opset 18] [--dynamic-batch]

The model is exported in its inference form: timm's `reparameterize_model` folds the train-time branches
of re-parameterisable architectures (FastViT's and MobileOne's blocks, RepVGG) into single convolutions,
as a device runs them; other models pass through unchanged. The exporter is torch's own
(`torch.onnx.export`, torch.export-based), weights inside the one file, the input named `image`
(float32 NCHW, normalised with the model's mean/std) and the output `logits` (the embedding when the model
has no task head). The file's metadata carries what a device needs to feed it: input size, mean, std,
class names.

Parity: the ONNX file runs under onnxruntime (CPU) on real eval views -- the first `--parity-samples`
images of `--data`, else of the data the checkpoint's run evaluated on (`val_data`, else `data`, from its
card) -- beside the model as `kt-student eval` runs it. The maximum absolute logit difference and the
top-1 agreement are reported with the file size; a difference above `--tolerance` is an error (exit 2)
and the file is not written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kt.config import check_config, field
from kt.errors import UserError, one_line

FORMATS = {"onnx": "ONNX, run under onnxruntime for the parity check"}
# the module methods timm's reparameterize_model calls (conv+bn fusion, RepVGG/MobileOne branches)
REPARAMETERIZE_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")


@dataclass
class ExportConfig:
    checkpoint: str = field("", "what to export: run folder, checkpoint folder or model name")
    format: str = field("onnx", f"export format: {', '.join(FORMATS)}")
    out: str = field("", "output file")
    image_size: int = field(0, "input size of the exported model (0: the checkpoint's; ViTs only their own)",
                            min=0)
    opset: int = field(18, "ONNX opset: 18 runs on onnxruntime >= 1.14 and most device runtimes", min=7)
    dynamic_batch: bool = field(False, "batch dimension left free (default: fixed at 1, as devices run)")
    data: str = field("", "eval shards for the parity check ('' : the data the checkpoint's run evaluated on)")
    parity_samples: int = field(32, "eval views compared between torch and onnxruntime", min=1)
    tolerance: float = field(1e-3, "largest max-abs logit difference accepted (fp32 kernels differ ~1e-5)",
                             gt=0)


def run_export(cfg: ExportConfig) -> dict:
    """Export, check parity, keep the file; returns the summary (printed by the CLI)."""
    from kt.checkpoints import load_model

    if cfg.format not in FORMATS:
        raise UserError(f"unknown --format {cfg.format!r}; choose from {', '.join(FORMATS)}")
    if not cfg.checkpoint or not cfg.out:
        raise UserError("export needs --checkpoint and --out")
    check_config(cfg)  # also when called as a library, not through build_config
    check_out_file(Path(cfg.out))
    model = load_model(cfg.checkpoint, what="--checkpoint").eval()
    size = cfg.image_size or model.image_size
    if getattr(model, "is_tokens", True) and size != model.image_size:  # ViTs and open_clip towers
        raise UserError(f"{model.arch} was built for {model.image_size} px; it cannot export at {size}")
    data = cfg.data or _run_data(model)
    x = eval_views(data, size, model, cfg.parity_samples)
    deployable = inference_form(model)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        export_onnx(deployable, tmp, size, cfg.opset, cfg.dynamic_batch)
        add_metadata(tmp, model, size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = onnx_outputs(tmp, x.numpy(), batched=cfg.dynamic_batch)
        parity = check_parity(expected, got, cfg.tolerance, has_head=model.head is not None)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "format": cfg.format, "model": model.arch, "image_size": size, "opset": cfg.opset,
            "dynamic_batch": cfg.dynamic_batch, "reparameterized": deployable is not model,
            "bytes": out.stat().st_size, "parity": {"data": data, "samples": int(x.shape[0]), **parity}}


def check_out_file(out: Path) -> None:
    """Refuse an --out no file can be written to before the export and the parity run spend their time."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the path of the .onnx file to write")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a directory")
            break


def inference_form(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a device runs it: re-parameterisable blocks folded (a copy); the model itself otherwise."""
    from timm.utils.model import reparameterize_model

    if not any(hasattr(m, hook) for m in model.modules() for hook in REPARAMETERIZE_HOOKS):
        return model
    return reparameterize_model(model, inplace=False).eval()


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, opset: int, dynamic_batch: bool) -> None:
    example = torch.zeros(2 if dynamic_batch else 1, 3, image_size, image_size)
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset, input_names=["image"],
                          output_names=["logits"], dynamic_shapes=dynamic, external_data=False, verbose=False)
    except Exception as e:  # an op the exporter or the opset cannot express: the user's choice of model/opset
        raise UserError(f"cannot export {getattr(model, 'arch', type(model).__name__)} to ONNX opset {opset}: "
                        f"{one_line(e)}") from e


def add_metadata(path: Path, model, image_size: int) -> None:
    """What a device needs to feed the file, inside it (ONNX metadata_props)."""
    import onnx

    proto = onnx.load(str(path))
    props = {"kt_arch": model.arch, "image_size": str(image_size), "mean": json.dumps(list(model.mean)),
             "std": json.dumps(list(model.std)), "input": "float32 NCHW RGB in [0, 1], then (x - mean) / std",
             "classes": json.dumps(model.classes) if model.classes else ""}
    onnx.helper.set_model_props(proto, {k: v for k, v in props.items() if v})
    onnx.save(proto, str(path))


def onnx_outputs(path: Path, x: np.ndarray, batched: bool) -> np.ndarray:
    """The ONNX file's outputs under onnxruntime (CPU); one image at a time when its batch is fixed at 1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if batched:
        return session.run(None, {name: x})[0]
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def check_parity(expected: np.ndarray, got: np.ndarray, tolerance: float, has_head: bool = True) -> dict:
    """Max abs difference and top-1 agreement; a UserError when the difference exceeds `tolerance`."""
    if expected.shape != got.shape:
        raise UserError(f"ONNX output shape {got.shape} differs from torch's {expected.shape}")
    diff = float(np.abs(expected.astype(np.float64) - got).max())
    result = {"max_abs_logit_diff": diff,
              "top1_agreement": float((expected.argmax(1) == got.argmax(1)).mean()) if has_head else None,
              "max_abs_logit": float(np.abs(expected).max()), "tolerance": tolerance}
    if not diff <= tolerance:  # NaN fails too
        raise UserError(f"ONNX parity failed: max abs logit difference {diff:.3g} > tolerance {tolerance:g} "
                        f"(top-1 agreement {result['top1_agreement']}); the file was not written")
    return result


def eval_views(data: str, image_size: int, model, samples: int) -> torch.Tensor:
    """The first `samples` eval views of the shards `data`, rendered as kt-student eval renders them."""
    from kt.shards import expand_shards
    from kt.student.data import eval_loader

    batches, n = [], 0
    for x, _, _ in eval_loader(expand_shards(data), image_size, model.mean, model.std, batch_size=samples,
                               workers=0):
        batches.append(x)
        n += len(x)
        if n >= samples:
            break
    if not n:
        raise UserError(f"no decodable images in {data} for the parity check")
    return torch.cat(batches)[:samples]


def _run_data(model) -> str:
    """The eval (else training) data recorded by the run that wrote the checkpoint."""
    run = (model.card.get("extra") or {}).get("run") or {}
    for key in ("val_data", "data"):
        if run.get(key):
            return run[key]
    raise UserError(f"no eval data for the parity check: {model.arch}'s checkpoint records none; give --data SHARDS")
