"""State dicts in the layouts their libraries use, into and out of a `TaskModel`; weight files.

A `TaskModel` keeps its backbone and its linear task head apart (`backbone.*`, `head.*`). Users and
other tools know models by their own library's state dict instead, so that is what kt writes
(`native_state`) and what it reads from anywhere (`load_state`):

- timm: the timm model's own state dict with the task head as timm's classifier (`classifier.*`,
  `head.fc.*`, `fc.*`, ... as the architecture names it), i.e. exactly what
  `timm.create_model(arch, num_classes=K, **model_args).state_dict()` holds. A few architectures have
  no single linear classifier on the pooled feature (distilled DeiT/LeViT heads): they keep kt's own
  layout, `native_state` says so.
- open_clip: the visual tower's own keys (what `CLIP.visual.load_state_dict` takes); the tower has no
  classifier, so kt's head rides beside it as `head.weight` / `head.bias`.
- kt's own layout (`backbone.*`, `head.*`): checkpoints written before checkpoints became library
  folders (format 1), still read.

`load_state` also takes plain timm / open_clip / full-CLIP state dicts, weights saved at another input
size (position embeddings resized the way timm and open_clip do for their own weights) and a family's
original format (timm's `checkpoint_filter_fn`). Folders, cards and fingerprints are `kt.checkpoints`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from kt.errors import UserError, one_line
from kt.models import OpenClipTaskModel, TaskModel, copy_head, load_strict

# Layout names, as recorded in a checkpoint's card.
LAYOUTS = {
    "timm": "the timm model's own state dict, task head as timm's classifier",
    "open_clip": "the open_clip visual tower's own state dict, task head as head.*",
    "kt": "kt's TaskModel state dict (backbone.*, head.*): format-1 checkpoints",
}
# safetensors header metadata: the Hugging Face convention for PyTorch tensors ("pt").
SAFETENSORS_METADATA = {"format": "pt"}


# ---------------------------------------------------------------------------------------- writing
def native_state(model: TaskModel, kt_layout: bool = False) -> tuple[str, dict[str, torch.Tensor], nn.Module | None]:
    """(layout, state dict, timm reference) of the model as its own library holds it (kt's, if `kt_layout`).

    The reference is the timm model of this architecture with `num_classes` outputs, built on the meta
    device (shapes only: no memory, no init cost); `kt.checkpoints` writes timm's config.json from it.
    """
    backbone = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    head = {} if model.head is None else {k: v.detach().cpu().contiguous()
                                          for k, v in model.head.state_dict().items()}
    if isinstance(model, OpenClipTaskModel) and not kt_layout:
        return "open_clip", {**backbone, **{f"head.{k}": v for k, v in head.items()}}, None
    reference = None if kt_layout else timm_reference(model)
    classifier = _classifier_slots(reference, backbone, head) if reference is not None else None
    if classifier is None:  # no timm layout for this head: kt's own
        return "kt", {**{f"backbone.{k}": v for k, v in backbone.items()},
                      **{f"head.{k}": v for k, v in head.items()}}, None
    return "timm", {**backbone, **classifier}, reference


def timm_reference(model: TaskModel) -> nn.Module | None:
    """The timm model kt's backbone + head stand for, on the meta device; None when timm cannot build it."""
    import timm
    from timm.models import get_model_args

    # the backbone's own reconstruction arguments (input size of ViTs, ...), with the head's classes
    args = dict(get_model_args(model.backbone), num_classes=model.num_classes)
    try:
        with torch.device("meta"):
            return timm.create_model(model.arch, pretrained=False, **args)
    except Exception:  # an architecture that does not build on the meta device: kt's layout still works
        return None


def _classifier_slots(reference: nn.Module, backbone: dict, head: dict) -> dict[str, torch.Tensor] | None:
    """kt's head under the reference's classifier keys and shapes; None when they do not correspond."""
    expected = reference.state_dict()
    if set(backbone) - set(expected) or any(expected[k].shape != v.shape for k, v in backbone.items()):
        return None
    extra = sorted(set(expected) - set(backbone))
    if not head:
        return {} if not extra else None
    name = reference.pretrained_cfg.get("classifier")
    if not isinstance(name, str) or extra != sorted((f"{name}.bias", f"{name}.weight")):
        return None  # e.g. distilled models: two heads averaged
    out = {}
    for param, value in head.items():
        shape = expected[f"{name}.{param}"].shape
        if value.numel() != shape.numel():
            return None
        out[f"{name}.{param}"] = value.reshape(shape)  # a 1x1-conv classifier holds (K, D, 1, 1)
    return out


# ---------------------------------------------------------------------------------------- reading
def load_state(model: TaskModel, state: dict[str, torch.Tensor], what: str, layout: str | None = None) -> bool:
    """Backbone weights (and the head, where its shape fits) from a state dict in any layout kt knows;
    whether the head was loaded.

    `layout` is the checkpoint card's when known; otherwise it is recognised from the keys.
    """
    state = dict(state)
    head = None
    if layout == "kt" or (layout is None and any(k.startswith("backbone.") for k in state)):
        head = strip_prefix(state, "head.") or None
        state = strip_prefix(state, "backbone.")
    elif isinstance(model, OpenClipTaskModel):
        if any(k.startswith("visual.") for k in state):  # a full CLIP state dict
            state = strip_prefix(state, "visual.")
        head = {k[len("head."):]: state.pop(k) for k in list(state) if k.startswith("head.")} or None
    else:
        state, head = pop_timm_classifier(model.backbone, state)
    if not _fits(model.backbone, state):
        state, filtered_head = _adapt_state(model, state)
        head = head or filtered_head
    load_strict(model.backbone, state, what=what)
    return copy_head(model, _head_shaped(model, head))


def _head_shaped(model: TaskModel, head: dict | None) -> dict | None:
    """`head` in the shapes of the model's head: a 1x1-conv classifier stores the head's (K, D) weight as
    (K, D, 1, 1)."""
    if not head or model.head is None:
        return head
    shapes = {k: v.shape for k, v in model.head.state_dict().items()}
    return {k: v.reshape(shapes[k]) if k in shapes and v.numel() == shapes[k].numel() else v
            for k, v in head.items()}


def load_exact(model: TaskModel, state: dict[str, torch.Tensor], what: str, layout: str) -> None:
    """Every tensor of the model from a checkpoint written for exactly this model (nothing adapted)."""
    if layout != "kt":
        if layout == "open_clip":
            head = strip_prefix(state, "head.")
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        else:
            state, head = pop_timm_classifier(model.backbone, state)
        head = _head_shaped(model, head) or {}
        state = {**{f"backbone.{k}": v for k, v in state.items()}, **{f"head.{k}": v for k, v in head.items()}}
    load_strict(model, state, what=what)


def pop_timm_classifier(backbone: nn.Module, state: dict) -> tuple[dict, dict | None]:
    """Take the classifier keys out of a timm state dict (kt's backbone has none): (rest, head)."""
    clf_name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or ""
    names = clf_name if isinstance(clf_name, (list, tuple)) else [clf_name]
    expected = set(backbone.state_dict())
    state, head = dict(state), None
    for clf in names:
        w, b = f"{clf}.weight", f"{clf}.bias"
        if w in state and w not in expected:
            weight, bias = state.pop(w), state.pop(b, None)
            if bias is not None and head is None:
                head = {"weight": weight, "bias": bias}
    return state, head


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _fits(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    expected = module.state_dict()
    return set(expected) == set(state) and all(expected[k].shape == v.shape for k, v in state.items())


def _adapt_state(model: TaskModel, state: dict) -> tuple[dict, dict | None]:
    """Weights saved at another input size or in the family's original format: resize position
    embeddings / convert keys the way timm and open_clip do when they load their own weights."""
    if isinstance(model, OpenClipTaskModel):
        from types import SimpleNamespace

        from open_clip.model import resize_pos_embed

        prefixed = {"visual." + k: v for k, v in state.items()}
        resize_pos_embed(prefixed, SimpleNamespace(visual=model.backbone))
        return strip_prefix(prefixed, "visual."), None
    filter_fn = getattr(sys.modules.get(type(model.backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state, None
    try:
        state = filter_fn(dict(state), model.backbone)
    except Exception:  # a filter that does not fit this state dict: report the mismatch as it is
        return state, None
    return pop_timm_classifier(model.backbone, state)


# ---------------------------------------------------------------------------------------- files
def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write atomically: a reader never sees half a file."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(_packed(state), str(tmp), metadata=SAFETENSORS_METADATA)
    os.replace(tmp, path)


def safetensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the bytes `write_safetensors` would write for `state` (without writing them)."""
    from safetensors.torch import save

    return hashlib.sha256(save(_packed(state), metadata=SAFETENSORS_METADATA)).hexdigest()


def _packed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous copies of channels_last weights (safetensors stores plain row-major tensors only)."""
    return {k: v.contiguous() for k, v in state.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise UserError(f"cannot read weights {path}: {e.strerror or e}") from e
    return digest.hexdigest()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
        raise UserError(f"cannot read weights {path}: {one_line(e)}") from e


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict file: `.safetensors`, or a torch pickle (`.pt`, `.pth`, `.bin`), tensors only."""
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read state dict {path}: {one_line(e)}") from e
        for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
