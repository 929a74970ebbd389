"""The first rendering implementation (view format version 1, as kt/views.py rendered before kt.render existed),
kept verbatim: the reference that the faster renders (`kt.render`, `kt.render_tensor`) are tested against
(tests/test_render_equivalence.py: MAD <= 1/255 over a test set of views) and that
`python -m tools.bench pipeline` times as "before". Crop-resize (bicubic), flip, colour jitter, then the
RandAugment ops one by one, one resample per geometric op, on the fully decoded image.

Caches do not need it: the view format version is still 1 and a cache built with these renders verifies
against `kt.render`'s (the reasoning is in `kt.render`'s docstring); it stays importable so that claim can
always be re-checked.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# parameter decoding is the view format's, shared with kt.render: only the rendering arithmetic is frozen here
from kt.render import as_params as _as_params, ops as _ops, out_size as _out_size
from kt.views import GEOMETRIC_OPS, JITTER_ORDERS

_FILL = (128, 128, 128)



def _crop_flip(img: Image.Image, p: np.ndarray, size: tuple[int, int], resample: int) -> Image.Image:
    """Crop and resize in one step, so a fractional box shows the same region at any output size."""
    W, H = img.size
    x0, y0, x1, y1 = (float(np.clip(v, 0.0, 1.0)) for v in p[0:4])
    out = img.resize(size, resample=resample, box=(x0 * W, y0 * H, x1 * W, y1 * H))
    if p[4] >= 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def _geometric(img: Image.Image, name: str, arg: float, resample: int, fill) -> Image.Image:
    """Size-free geometric ops: affine maps about the image centre in units of the output size."""
    w, h = img.size
    if name == "Rotate":
        return img.rotate(arg, resample=resample, fillcolor=fill)
    if name == "ShearX":
        coeffs = (1, arg, -arg * h / 2, 0, 1, 0)
    elif name == "ShearY":
        coeffs = (1, 0, 0, arg, 1, -arg * w / 2)
    elif name == "TranslateX":
        coeffs = (1, 0, arg * w, 0, 1, 0)
    else:  # TranslateY
        coeffs = (1, 0, 0, 0, 1, arg * h)
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=fill)


_ENHANCE = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
            "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
_JITTER = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def _photometric(img: Image.Image, name: str, arg: float) -> Image.Image:
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Solarize":
        return ImageOps.solarize(img, threshold=int(round(arg)))
    if name == "Posterize":
        return ImageOps.posterize(img, int(round(arg)))
    return _ENHANCE[name](img).enhance(arg)


def render(image: Image.Image, params: np.ndarray, size: int | tuple[int, int]) -> Image.Image:
    """The view described by `params` of `image`, RGB at `size` (an int for square, or (width, height))."""
    p = _as_params(params)
    img = image if image.mode == "RGB" else image.convert("RGB")
    out = _crop_flip(img, p, _out_size(size), Image.Resampling.BICUBIC)
    # At this point we have the crop at output size; colours are changed at output size, cheapest.
    for s in JITTER_ORDERS[int(round(p[8]))]:
        if p[5 + s] != 1.0:
            out = _JITTER[s](out).enhance(float(p[5 + s]))
    for name, arg in _ops(p):
        if name in GEOMETRIC_OPS:
            out = _geometric(out, name, arg, Image.Resampling.BILINEAR, _FILL)
        else:
            out = _photometric(out, name, arg)
    return out


def render_mask(mask: Image.Image, params: np.ndarray, size: int | tuple[int, int], fill: int = 255) -> Image.Image:
    """The geometric part of `render` on a label mask, nearest-neighbour so no new labels appear.

    Pixels brought in from outside by rotate/shear/translate get `fill` (255, the usual ignore index).
    """
    p = _as_params(params)
    out = _crop_flip(mask, p, _out_size(size), Image.Resampling.NEAREST)
    for name, arg in _ops(p):
        if name in GEOMETRIC_OPS:
            out = _geometric(out, name, arg, Image.Resampling.NEAREST, fill)
    return out
