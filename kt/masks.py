"""Segmentation masks: the format beside each image in a shard, and the checks a mask must pass.

A sample's mask is the member `<key>.mask.png`: one class index per pixel, the classes (background included) as
`classes.json` lists them. 8-bit while the classes fit below 255, which is the ignore label (the usual ignore
index: ADE20K as mmsegmentation converts it, VOC, Cityscapes' train ids); a 16-bit PNG above 255 classes, where
65535 is the ignore label (`ignore_label`). A 16-bit mask is held as PIL mode "I" (32-bit), which PIL can resize
and transform; "I;16" it cannot transform.

A mask that does not decode or whose size is not its image's makes the sample bad (counted by
`kt.shards.BadSamples`, like an undecodable image); a label >= K other than the ignore label is refused outright
(one line naming key and value): it means the masks and `classes.json` disagree about the whole set, not that
one file is damaged.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from kt.errors import UserError

MASK_EXT = "mask.png"  # webdataset splits members at the first dot: `<key>.mask.png` is the sample's "mask.png"
IGNORE_8BIT = 255  # the usual ignore index (ADE20K, VOC, Cityscapes converted by mmseg)
IGNORE_16BIT = 65535  # the same idea where 255 is a class


def ignore_label(num_classes: int) -> int:
    """The mask value that means "no label" for a set of `num_classes` classes: 255 while the classes fit
    in 8 bits below it, 65535 (16-bit masks) above."""
    return IGNORE_8BIT if num_classes <= IGNORE_8BIT else IGNORE_16BIT


def decode_mask(data: bytes, image_size: tuple[int, int], num_classes: int, key: str) -> Image.Image:
    """A mask member decoded and checked against its image's size and the class count.

    A mask that does not decode or has another size raises ValueError (the caller counts the sample bad);
    a label >= `num_classes` other than the ignore label raises UserError."""
    mask = Image.open(io.BytesIO(data))
    mask.load()
    if mask.mode in ("I;16", "I;16B", "I;16L", "I"):
        mask = mask.convert("I")  # 32-bit signed: what PIL resizes and transforms (I;16 it cannot transform)
    elif mask.mode != "L":
        raise ValueError(f"mask is {mask.mode}, not an 8-bit or 16-bit single-channel PNG")
    if mask.size != tuple(image_size):
        raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, its image {image_size[0]}x{image_size[1]}")
    values = np.unique(np.asarray(mask))
    beyond = values[(values >= num_classes) & (values != ignore_label(num_classes))]
    if len(beyond):
        raise UserError(f"sample {key}: mask label {int(beyond[0])} is not a class ({num_classes} classes in "
                        f"classes.json; {ignore_label(num_classes)} is the ignore label)")
    return mask


def encoded_size(data: bytes) -> tuple[int, int]:
    """An encoded image's size from its header alone (the image itself may be decoded at reduced scale)."""
    return Image.open(io.BytesIO(data)).size


