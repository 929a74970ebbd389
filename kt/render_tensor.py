"""Rendering stored views as batched tensor operations: the GPU path (also runs on CPU tensors).

`render_batch(sources, params, size)` renders N views of N decoded uint8 images (3, H, W) on their device
and returns (N, 3, h, w): uint8, or normalised float32 when `mean`/`std` are given. `decode_batch`
decodes image bytes with `torchvision.io`, JPEGs on the GPU (nvJPEG) when the device is CUDA.
`default_device()` is "cuda" when CUDA is present; `kt-cache build --render cuda` renders on the teacher's GPU,
its DataLoader workers only decoding. `--render auto` does not choose it: measured on an H200 this exact,
image-by-image path renders ~360 train views/s at 224 px (launch-bound), less than two CPU cores with PIL
(docs/benchmarks.md). The student stream does not use it yet.

The path replays `kt.render` step for step, from the same plan (`kt.render.plan`: the crop, the flip
folded into the first run of geometric ops, one affine map per run, clipped as the reference), and
emulates PIL's 8-bit arithmetic instead of approximating it with torchvision's float ops, because
the tolerance against the CPU render is tight (MAD <= 1/255):
- crop + resize: PIL's separable antialiased bicubic (a = -0.5, support scaled by the shrink factor) with
  the exact fractional box, as two small matrix products per view (horizontal, rounded to 8 bits as PIL
  stores its intermediate, then vertical); torchvision's `resized_crop` takes integer boxes only;
- affine runs: `grid_sample` (bilinear, border clamp) on PIL's pixel-centre convention, with PIL's fill
  rule (a centre mapped outside the frame gets the fill);
- colour jitter and RandAugment photometric ops: PIL's formulas (blend = trunc(a + f (b - a)) in float32,
  ITU-R 601 luma in 16-bit fixed point, histogram LUTs for autocontrast/equalize, the 3x3 SMOOTH
  kernel with copied borders for sharpness), applied per view in the stored order.
tests/test_render_tensor.py compares it with the PIL render on the same parameters.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kt.render import FILL, Affine, as_params, crop_box, out_size, plan


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -------------------------------------------------------------------------------------------- decoding
def decode_batch(datas: Sequence[bytes], device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Image bytes -> uint8 RGB tensors (3, H, W) on `device`; JPEGs decode on the GPU when it is CUDA."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    device = torch.device(device) if device is not None else default_device()
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    is_jpeg = [d[:3] == b"\xff\xd8\xff" for d in datas]
    out: list[torch.Tensor | None] = [None] * len(datas)
    if device.type == "cuda" and any(is_jpeg):
        idx = [i for i, j in enumerate(is_jpeg) if j]
        for i, img in zip(idx, decode_jpeg([raw[i] for i in idx], mode=ImageReadMode.RGB, device=device)):
            out[i] = img
    for i, r in enumerate(raw):
        if out[i] is None:
            out[i] = decode_image(r, mode=ImageReadMode.RGB).to(device)
    return out  # type: ignore[return-value]


def images_to_tensors(images, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Decoded PIL images -> uint8 RGB tensors (3, H, W)."""
    device = torch.device(device) if device is not None else default_device()
    return [torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous().to(device)
            for im in images]


# ---------------------------------------------------------------------------------------- crop + resize
def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5  # PIL's bicubic
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _resample_matrix(n_in: int, n_out: int, lo: float, hi: float, device) -> tuple[torch.Tensor, int, int]:
    """PIL's `precompute_coeffs` (ImagingResample) as a dense (n_out, span) matrix over input [first, last)."""
    scale = (hi - lo) / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    centers = lo + (np.arange(n_out) + 0.5) * scale
    xmin = np.clip((centers - support + 0.5).astype(np.int64), 0, None)  # C's (int) truncates; args >= -0.5
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), n_in)
    first, last = int(xmin.min()), int(xmax.max())
    j = torch.arange(first, last, device=device, dtype=torch.float64)
    c = torch.from_numpy(centers).to(device)
    w = _bicubic((j[None, :] - c[:, None] + 0.5) / filterscale)
    inside = (j[None, :] >= torch.from_numpy(xmin).to(device)[:, None]) & \
             (j[None, :] < torch.from_numpy(xmax).to(device)[:, None])
    w = torch.where(inside, w, torch.zeros_like(w))
    total = w.sum(1, keepdim=True)
    w = torch.where(total != 0, w / total, w)
    return w.to(torch.float32), first, last


def _round8(x: torch.Tensor) -> torch.Tensor:
    return (x + 0.5).floor().clamp_(0, 255)


def crop_resize(src: torch.Tensor, p: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """PIL `resize(size, BICUBIC, box=crop)` of a (3, H, W) image, as float holding 8-bit values."""
    _, H, W = src.shape
    x0, y0, x1, y1 = crop_box(p)
    w, h = size
    bx0, by0, bx1, by1 = x0 * W, y0 * H, x1 * W, y1 * H
    x = src.to(torch.float32)
    # PIL skips a pass that would change nothing (same size, box at the origin)
    vertical = not (h == H and by0 == 0 and by1 == H)
    if vertical:
        wy, yfirst, ylast = _resample_matrix(H, h, by0, by1, src.device)
        x = x[:, yfirst:ylast]  # the horizontal pass only runs over the rows the vertical pass reads
    if not (w == W and bx0 == 0 and bx1 == W):
        wx, first, last = _resample_matrix(W, w, bx0, bx1, src.device)
        x = _round8(torch.matmul(x[:, :, first:last], wx.t()))
    if vertical:
        x = _round8(torch.matmul(wy, x))
    return x


# -------------------------------------------------------------------------------------------- geometry
def _centres(maps: Sequence[Affine], w: int, h: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=device, dtype=torch.float64) + 0.5, indexing="ij")
    return [(a * xs + b * ys + c, d * xs + e * ys + f) for a, b, c, d, e, f in maps]


def affine(x: torch.Tensor, matrix: Affine, clips: Sequence[Affine], fill: Sequence[float]) -> torch.Tensor:
    """One bilinear resample of (3, h, w) by PIL's output->input `matrix`, filled where it or a clip map
    sends a pixel centre outside the frame."""
    _, h, w = x.shape
    (u, v), *rest = _centres([matrix, *clips], w, h, x.device)
    grid = torch.stack([2 * u / w - 1, 2 * v / h - 1], -1).to(torch.float32)[None]
    out = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    out = out.trunc().clamp_(0, 255)  # PIL's bilinear transform truncates (measured: rounding misses 45%)
    keep = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    for cu, cv in rest:
        keep &= (cu >= 0) & (cu < w) & (cv >= 0) & (cv < h)
    fill_t = torch.tensor(fill, dtype=out.dtype, device=out.device).view(-1, 1, 1)
    return torch.where(keep[None], out, fill_t)


# ----------------------------------------------------------------------------------------- photometric
def _blend(degenerate: torch.Tensor, x: torch.Tensor, f: float) -> torch.Tensor:
    return (degenerate + torch.tensor(f, dtype=torch.float32) * (x - degenerate)).trunc().clamp_(0, 255)


def _luma(x: torch.Tensor) -> torch.Tensor:
    i = x.to(torch.int64)
    return ((i[0] * 19595 + i[1] * 38470 + i[2] * 7471 + 0x8000) >> 16).to(torch.float32)[None]


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-channel LUT (3, 256) applied to (3, h, w)."""
    idx = x.to(torch.int64).flatten(1)
    return torch.gather(lut.to(x.dtype), 1, idx).view_as(x)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    luts = []
    ramp = torch.arange(256, device=x.device, dtype=torch.float64)
    for ch in x:
        nz = torch.nonzero(torch.bincount(ch.to(torch.int64).flatten(), minlength=256))
        lo, hi = int(nz.min()), int(nz.max())
        if hi <= lo:
            luts.append(ramp)
            continue
        scale = 255.0 / (hi - lo)
        luts.append((ramp * scale - lo * scale).trunc().clamp(0, 255))
    return _lut(x, torch.stack(luts))


def _equalize(x: torch.Tensor) -> torch.Tensor:
    luts = []
    ramp = torch.arange(256, device=x.device, dtype=torch.float64)
    for ch in x:
        hist = torch.bincount(ch.to(torch.int64).flatten(), minlength=256)
        used = hist[hist > 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
        if not step:
            luts.append(ramp)
            continue
        n = step // 2 + torch.cat([hist.new_zeros(1), hist.cumsum(0)[:-1]])
        luts.append(torch.div(n, step, rounding_mode="floor").clamp(max=255).to(torch.float64))
    return _lut(x, torch.stack(luts))


def _smooth(x: torch.Tensor) -> torch.Tensor:
    k = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    k[:, :, 1, 1] = 5
    inner = _round8(F.conv2d(x[None], k / 13.0, groups=3)[0])
    out = x.clone()
    out[:, 1:-1, 1:-1] = inner  # PIL's 3x3 filters copy the border pixels
    return out


def photometric(x: torch.Tensor, name: str, arg: float) -> torch.Tensor:
    """One RandAugment colour op (or colour jitter factor) on (3, h, w) float holding 8-bit values."""
    if name == "Identity":
        return x
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Solarize":
        return torch.where(x < int(round(arg)), x, 255 - x)
    if name == "Posterize":
        mask = ~(2 ** (8 - int(round(arg))) - 1) & 0xFF
        return (x.to(torch.int64) & mask).to(x.dtype)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, arg)
    if name == "Contrast":
        mean = math.floor(float(_luma(x).to(torch.float64).mean()) + 0.5)
        return _blend(torch.full_like(x, mean), x, arg)
    if name == "Color":
        return _blend(_luma(x).expand_as(x), x, arg)
    if name == "Sharpness":
        return _blend(_smooth(x), x, arg)
    raise ValueError(f"unknown photometric op {name!r}")


_JITTER_NAMES = ("Brightness", "Contrast", "Color")


# ------------------------------------------------------------------------------------------- rendering
def render_one(src: torch.Tensor, params, size: int | tuple[int, int]) -> torch.Tensor:
    """One view as (3, h, w) float holding 8-bit values, on `src`'s device."""
    p = as_params(params)
    size = out_size(size)
    x = crop_resize(src, p, size)
    for kind, arg in plan(p, *size):
        if kind == "flip":
            x = x.flip(-1)
        elif kind == "affine":
            x = affine(x, *arg, FILL)
        elif kind == "jitter":
            x = photometric(x, _JITTER_NAMES[arg], float(p[5 + arg]))
        else:
            x = photometric(x, *arg)
    return x


def render_batch(sources: Sequence[torch.Tensor], params, size: int | tuple[int, int],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """Views params[i] of sources[i] as (N, 3, h, w): uint8, or normalised float32 given mean and std."""
    params = np.asarray(params, dtype=np.float32).reshape(len(sources), -1)
    with torch.no_grad():
        x = torch.stack([render_one(s, p, size) for s, p in zip(sources, params)])
        if mean is None or std is None:
            return x.to(torch.uint8)
        s = torch.tensor(std, dtype=torch.float64)
        scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, 3, 1, 1).to(x.device)
        shift = (torch.tensor(mean, dtype=torch.float64) / s).to(torch.float32).view(1, 3, 1, 1).to(x.device)
        return x.mul_(scale).sub_(shift)
