"""Segmentation models: backbones made to output stride 8/16/32 and the DeepLabV3 head on their grid.

`kt.models.create_model(..., task="segmentation", output_stride=OS)` builds through here. A dense task wants
a finer grid than classification backbones give (stride 14-32), and each family gets there its own way:

- timm ViTs (`vision_transformer`: ViT, DeiT, DINOv2, ...): timm has no stride option. The model is built at
  its native size with `dynamic_img_size=True` (so the position embeddings keep their pretrained grid, e.g.
  DINOv2's 37x37, and are resampled by timm to the input's grid in every forward), and the patch
  embedding's conv is made to step by OS: `stride=(OS, OS)`, padding `max(0, ceil((k - OS) / 2))` with k
  the kernel (3 for DINOv2's 14 at OS 8), which makes the grid exactly H/OS for any H divisible by OS. The
  kernel and its weights stay as trained: patches overlap instead of being resized (timm's
  `set_input_size(patch_size=8)` would resize the kernel, which is not the recipe).
- open_clip ViT towers: the same on `conv1`; open_clip adds `positional_embedding` without resampling, so it
  is resampled once to the H/OS grid (`timm.layers.resample_abs_pos_embed`, bicubic, class token kept).
- mobilevitv2_*, tf_efficientnet_lite*: timm's own `output_stride` (dilated convolutions); the ImageNet
  weights fit unchanged (dilation changes no parameter).
- fastvit_*: timm refuses `output_stride`; the stride-2 patch embeddings in front of stages 2 and 3 are set
  to stride 1 (the large and small kernel convs and the module's own `stride`, which
  `reparameterize_model` uses to build the fused conv). No dilation is added: timm's RepMixer and RepCPE
  `reparameterize()` build their fused convs without a dilation argument (timm 1.0.31; MobileOneBlock keeps
  its own), so dilated token mixers would change output under `reparameterize_model`; the receptive field of
  stages 2-3 shrinks instead (4x more cells for the same kernels).

Head: torchvision's DeepLabV3 (ASPP + 3x3 conv + BN + ReLU + 1x1 conv, the paper's), with the ASPP width
`head_width` and atrous rates scaled to the grid (`aspp_rates`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from kt.errors import UserError

OUTPUT_STRIDES = (8, 16, 32)

# The families kt can restride, each with how (the names a user can give are in the descriptions).
RESTRIDE_FAMILIES = {
    "timm-vit": "timm ViTs (vit_*, deit_*, *_dinov2): patch conv stride, position embeddings resampled",
    "open_clip-vit": "open_clip ViT towers (open_clip:ViT-*): conv1 stride, positional_embedding resampled",
    "timm-dilated": "mobilevitv2_*, tf_efficientnet_lite*: timm output_stride (dilated)",
    "fastvit": "fastvit_*: stride 1 in the stage 2/3 patch embeddings",
}
_DILATED_PREFIXES = ("mobilevitv2_", "tf_efficientnet_lite")
_FASTVIT_NATIVE_STRIDE = 32
# DeepLabV3's rates (12, 24, 36) are for output stride 8 on 513-520 px crops: a 65x65 grid. Scaled to a
# grid g they keep the same field of view as a fraction of the image.
STOCK_ASPP_RATES = (12, 24, 36)
STOCK_ASPP_GRID = 65


def check_output_stride(output_stride, image_size: int) -> int:
    """The output stride, checked against the valid ones and the input size."""
    if output_stride not in OUTPUT_STRIDES:
        raise UserError(f"output stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride}")
    if image_size % output_stride:
        raise UserError(f"image size {image_size} is not divisible by the output stride {output_stride}")
    return int(output_stride)


def timm_family(name: str) -> str:
    """The restride family of a timm model name; a UserError listing the families when there is none."""
    from timm.models import model_entrypoint

    if name.startswith(_DILATED_PREFIXES):
        return "timm-dilated"
    if name.startswith("fastvit_"):
        return "fastvit"
    if model_entrypoint(name).__module__ == "timm.models.vision_transformer":
        return "timm-vit"
    raise cannot_restride(name)


def cannot_restride(name: str) -> UserError:
    return UserError(f"kt cannot make {name} output stride 8/16/32; it can: "
                     + "; ".join(RESTRIDE_FAMILIES.values()))


def timm_create_kwargs(family: str, output_stride: int) -> dict:
    """Arguments for `timm.create_model` that the family's restriding needs (no input size for ViTs:
    they are built at the native size so the pretrained position grid is kept)."""
    if family == "timm-dilated":
        return {} if output_stride == 32 else {"output_stride": output_stride}
    if family == "timm-vit":
        return {"dynamic_img_size": True}
    return {}


def restride_timm(family: str, backbone: nn.Module, output_stride: int) -> None:
    """Restride a timm backbone built with `timm_create_kwargs` in place."""
    if family == "timm-vit":
        if not isinstance(backbone.patch_embed.proj, nn.Conv2d):
            raise UserError(f"{type(backbone).__name__} has no convolutional patch embedding to restride")
        restride_patch_conv(backbone.patch_embed.proj, output_stride)
        # timm's PatchEmbed checks divisibility and sizes its dynamic grid by patch_size: the step now
        backbone.patch_embed.patch_size = (output_stride, output_stride)
    elif family == "fastvit":
        restride_fastvit(backbone, output_stride)


def restride_patch_conv(conv: nn.Conv2d, output_stride: int) -> None:
    """Make a patch conv step by `output_stride` with a grid of exactly H / output_stride (kernel kept)."""
    padding = tuple(max(0, math.ceil((k - output_stride) / 2)) for k in conv.kernel_size)
    conv.stride = (output_stride, output_stride)
    conv.padding = padding


def conv_grid(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """(h, w) a conv gives for an input of (height, width): the convolution arithmetic, so that a grid
    never comes from dividing by a patch size that no longer is the step."""
    sizes = []
    for n, k, s, p, d in zip((height, width), conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


def restride_fastvit(backbone: nn.Module, output_stride: int) -> None:
    """Stride 1 in the patch embeddings of the last stages, enough of them to reach `output_stride`."""
    stages = [s for s in backbone.stages if not isinstance(s.downsample, nn.Identity)]
    keep = int(math.log2(_FASTVIT_NATIVE_STRIDE // output_stride))  # how many stride-2 steps to remove
    for stage in stages[len(stages) - keep:] if keep else []:
        lkc = stage.downsample.proj[0]  # ReparamLargeKernelConv
        lkc.stride = 1  # reparameterize() builds the fused conv with this stride
        for conv in (getattr(lkc, "large_conv", None), getattr(lkc, "small_conv", None),
                     getattr(lkc, "reparam_conv", None)):
            if conv is not None:
                (conv.conv if hasattr(conv, "conv") else conv).stride = (1, 1)


def restride_open_clip(visual: nn.Module, output_stride: int, image_size: int) -> None:
    """conv1 steps by `output_stride`; positional_embedding resampled once to the H/OS grid."""
    from timm.layers import resample_abs_pos_embed

    restride_patch_conv(visual.conv1, output_stride)
    old = tuple(visual.grid_size)
    new = conv_grid(visual.conv1, image_size, image_size)
    with torch.no_grad():
        pos = resample_abs_pos_embed(visual.positional_embedding.detach()[None], new_size=new, old_size=old,
                                     num_prefix_tokens=1)[0]
    visual.positional_embedding = nn.Parameter(pos)
    visual.grid_size = new
    visual.image_size = (image_size, image_size)


# ---------------------------------------------------------------------------------------- head
def aspp_rates(grid: int) -> tuple[int, ...]:
    """ASPP atrous rates for a `grid` x `grid` map: the stock (12, 24, 36) scaled by grid / 65, rounded,
    at least 1, duplicates dropped. The stock rates on an 8x8 grid would see only zero padding beyond
    the centre tap, i.e. be 1x1 convs; scaled (1, 3, 4) they keep the paper's field of view."""
    rates = []
    for stock in STOCK_ASPP_RATES:
        rate = max(1, round(stock * grid / STOCK_ASPP_GRID))
        if rate not in rates:
            rates.append(rate)
    return tuple(rates)


def deeplabv3_head(in_channels: int, num_classes: int, grid: int, width: int = 256,
                   rates: Sequence[int] | None = None) -> nn.Sequential:
    """torchvision's DeepLabV3 head with the ASPP width and rates given (by default `aspp_rates(grid)`); the
    layer list of `torchvision.models.segmentation.deeplabv3.DeepLabHead`, which fixes the width at 256 (the
    default here builds the same module, state dict keys included)."""
    from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

    if width < 1:
        raise UserError(f"head width must be >= 1, got {width}")
    rates = tuple(rates) if rates else aspp_rates(grid)
    if width == 256:
        return DeepLabHead(in_channels, num_classes, rates)
    return nn.Sequential(ASPP(in_channels, rates, width), nn.Conv2d(width, width, 3, padding=1, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, num_classes, 1))
