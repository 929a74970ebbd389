"""Rendering stored views as batched tensor operations: the GPU path (also runs on CPU tensors).

`render_batch(sources, params, size)` renders N views of N decoded uint8 images (3, H, W) on their device
and returns (N, 3, h, w): uint8, or normalised float32 when `mean`/`std` are given. `decode_batch`
decodes image bytes with `torchvision.io`, JPEGs on the GPU (nvJPEG) when the device is CUDA.
`default_device()` is "cuda" when CUDA is present; `kt-cache build --render cuda` renders on the teacher's
GPU and `kt-student train --render cuda` on the student's, their DataLoader workers only decoding
(`render_device_for`).

The batched formulation: the work per batch is a fixed number of kernels, whatever N.
- crop + resize: PIL's separable antialiased bicubic (a = -0.5, support scaled by the shrink factor) with
  the exact fractional box, as one gather of each view's source span and two batched `matmul`s
  (horizontal, rounded to 8 bits as PIL stores its intermediate, then vertical). The filter taps of the
  whole batch are computed on the host in one vectorised step (~0.1 ms per view) and scattered into
  dense bands on the device; torchvision's `resized_crop` takes integer boxes only.
- each view's plan (`kt.render.plan`) is laid out by stage (flip, the three jitter positions, the four
  RandAugment slots), and each (stage, op) runs once for all the views that have it, each with its own
  argument: one `grid_sample` per slot for every geometric run of the batch, colour ops as batched tensor
  arithmetic over per-view factors, histograms for equalize as one scatter-add.
- where `kt.render` joins the crop to the first geometric run (`kt.render.joined_run`), so does this
  path: those views are sampled from the source by one `grid_sample` of the composed map up front.
- PIL's 8-bit arithmetic is emulated rather than approximated with torchvision's float ops, because the
  tolerance against the CPU render is tight (MAD <= 1/255): blends truncate in float32, ITU-R 601 luma
  in 16-bit fixed point, histogram LUTs, the 3x3 SMOOTH kernel with copied borders for sharpness, the
  bilinear transform truncates and fills where any map of a run sends a pixel centre outside the frame.
tests/test_render_tensor.py compares it with the PIL render on the same parameters (CPU tensors; CUDA
under the `gpu` marker).

Measured on an H200 (docs/benchmarks.md): the batched path renders 2,260 train views/s at 224 px (the
image-by-image path before it: ~360), for ~0.45 host-CPU ms a view; but that host work runs in the main
thread, and a ViT-L/14 build ran slower with it (669 views/s) than with 8 PIL workers (1,220), so
`--render auto` keeps the CPU workers.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kt.errors import UserError
from kt.render import FILL, Affine, as_params, compose, crop_box, joined_run, normalize, out_size, plan
from kt.views import JITTER_ORDERS


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
def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # PIL's bicubic
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _resample_taps(n_in: np.ndarray, n_out: int, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PIL's `precompute_coeffs` (ImagingResample) for N views at once: each output pixel's taps, as weights
    and source indices (N, n_out, K), K the widest filter of the batch (unused taps weigh 0).

    Vectorised over the batch on the host: a view costs a few microseconds, where a dense matrix per view
    cost milliseconds (the host, not the GPU, limited the per-view path to ~360 views/s on an H200)."""
    scale = (hi - lo) / n_out  # (N,)
    filterscale = np.maximum(scale, 1.0)
    support = 2.0 * filterscale  # bicubic's support, scaled by the shrink
    k = int(np.ceil(support.max())) * 2 + 1
    centers = lo[:, None] + (np.arange(n_out) + 0.5) * scale[:, None]  # (N, n_out)
    xmin = np.clip(np.trunc(centers - support[:, None] + 0.5), 0, None).astype(np.int64)  # C's (int) truncates
    xmax = np.minimum(np.trunc(centers + support[:, None] + 0.5).astype(np.int64), n_in[:, None])
    j = xmin[..., None] + np.arange(k)  # (N, n_out, K)
    w = _bicubic((j - centers[..., None] + 0.5) / filterscale[:, None, None])
    w = np.where(j < xmax[..., None], w, 0.0)
    total = w.sum(-1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1.0), w)
    # PIL skips a pass that would change nothing (same size, box at the origin): no rounding, one tap of 1
    same = (n_in == n_out) & (lo == 0) & (hi == n_in)
    if same.any():
        w[same] = 0.0
        w[same, :, 0] = 1.0
        j[same] = np.arange(n_out)[:, None]
    return w.astype(np.float32), np.minimum(j, n_in[:, None, None] - 1)


def _on(data, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data (numpy, a list) as a tensor on `device`, without waiting for the GPU. A blocking copy to a GPU
    synchronises its stream first, so each of the render's small uploads stalled the host until the work queued
    before it (the teacher's forward of the batch in flight) had finished. From pageable memory a non_blocking
    copy is staged at once: safe, and the stream orders it."""
    return torch.as_tensor(data, dtype=dtype).to(device, non_blocking=True)


def _band(w: np.ndarray, j: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps (N, n_out, K) as dense matrices (N, n_out, span) over each view's span [first, first + span),
    built on the device by one scatter (zero-weight taps add nothing), and each view's first index."""
    first = j.min(axis=(1, 2))
    span = int((j.max(axis=(1, 2)) - first).max()) + 1
    rel = _on(j - first[:, None, None], device)
    dense = torch.zeros(w.shape[:2] + (span,), dtype=torch.float32, device=device)
    return dense.scatter_add_(2, rel, _on(w, device)), _on(first, device)


def _round8(x: torch.Tensor) -> torch.Tensor:
    return (x + 0.5).floor_().clamp_(0, 255)


def _sources(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, 3, Hmax, Wmax) uint8: one stack when the sources share a size (the same image's views, a
    square-resized set), zero-padded otherwise (the padding gets zero weight)."""
    if all(s.shape == sources[0].shape for s in sources):
        return torch.stack(list(sources))
    hmax, wmax = max(s.shape[1] for s in sources), max(s.shape[2] for s in sources)
    out = sources[0].new_zeros((len(sources), 3, hmax, wmax))
    for i, s in enumerate(sources):
        out[i, :, : s.shape[1], : s.shape[2]] = s
    return out


def crop_resize(src: torch.Tensor, sources: Sequence[torch.Tensor], params: Sequence[np.ndarray],
                size: tuple[int, int]) -> torch.Tensor:
    """PIL `resize(size, BICUBIC, box=crop)` of each source, as (N, 3, h, w) float holding 8-bit values.

    PIL's separable antialiased resample as two batched matrix products (horizontal, rounded to 8 bits as
    PIL stores its intermediate, then vertical), each view's matrix over the span of source pixels it reads:
    one gather, two `matmul`s and two roundings for the whole batch. `src` is `_sources(sources)`."""
    w, h = size
    device = src.device
    W = np.array([s.shape[2] for s in sources], dtype=np.int64)
    H = np.array([s.shape[1] for s in sources], dtype=np.int64)
    box = np.array([crop_box(p) for p in params], dtype=np.float64).reshape(-1, 4)
    wx, fx = _band(*_resample_taps(W, w, box[:, 0] * W, box[:, 2] * W), device)  # (N, w, Sx)
    wy, fy = _band(*_resample_taps(H, h, box[:, 1] * H, box[:, 3] * H), device)  # (N, h, Sy)
    n, sx, sy = len(sources), wx.shape[2], wy.shape[2]
    # the spans, gathered: indices past a source's edge are clamped and meet zero weights
    cols = (fx[:, None] + torch.arange(sx, device=device)).clamp_(max=src.shape[3] - 1)
    rows = (fy[:, None] + torch.arange(sy, device=device)).clamp_(max=src.shape[2] - 1)
    i = torch.arange(n, device=device)[:, None, None]
    x = src.permute(0, 2, 3, 1)[i, rows[:, :, None], cols[:, None, :]]  # (N, Sy, Sx, 3)
    x = x.permute(0, 3, 1, 2).to(torch.float32)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would move ~1 pixel in 10 by one level
    try:
        x = _round8(torch.matmul(x, wx.transpose(1, 2)[:, None]))  # (N, 3, Sy, w)
        x = _round8(torch.matmul(wy[:, None], x))  # (N, 3, h, w)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return x


# -------------------------------------------------------------------------------------------- geometry
def _inside(u: torch.Tensor, v: torch.Tensor, w: int, h: int) -> torch.Tensor:
    return (u >= 0) & (u < w) & (v >= 0) & (v < h)


def _centres(maps: np.ndarray, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel centres (xs, ys) and where each of the (n, K, 6) maps sends them, (u, v) of shape (n, K, h, w)."""
    m = _on(maps, device)  # float64: centres far from the origin keep their sub-pixel part
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=device, dtype=torch.float64) + 0.5, indexing="ij")
    coef = m.view(m.shape[0], -1, 6, 1, 1)
    u = coef[:, :, 0] * xs + coef[:, :, 1] * ys + coef[:, :, 2]
    v = coef[:, :, 3] * xs + coef[:, :, 4] * ys + coef[:, :, 5]
    return xs, ys, u, v


def _keep(maps: np.ndarray, h: int, w: int, device) -> torch.Tensor:
    """(n, 1, h, w): pixels whose centre every map sends into the frame."""
    _, _, u, v = _centres(maps, h, w, device)
    return _inside(u, v, w, h).all(1, keepdim=True)


def affine(x: torch.Tensor, maps: np.ndarray, fill: Sequence[float], source: torch.Tensor | None = None,
           first: np.ndarray | None = None) -> torch.Tensor:
    """One bilinear `grid_sample` for n views (n, 3, h, w): `maps` (n, K, 6) holds each view's output->input
    matrix (PIL order) then its clip maps, padded with identities; a pixel is filled where any map sends its
    centre outside the frame (PIL's fill rule, and the reference's one fill per op). With `source` (n, 3, H, W),
    the views are sampled from it by `first` (n, 6), the crop composed with the run, instead of from `x`."""
    n, _, h, w = x.shape
    xs, ys, u, v = _centres(maps, h, w, x.device)
    if source is None:
        grid = torch.stack([2 * u[:, 0] / w - 1, 2 * v[:, 0] / h - 1], -1).to(torch.float32)
    else:
        a = _on(first, x.device).view(n, 6, 1, 1)
        su, sv = a[:, 0] * xs + a[:, 1] * ys + a[:, 2], a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
        H, W = source.shape[2:]
        grid = torch.stack([2 * su / W - 1, 2 * sv / H - 1], -1).to(torch.float32)
        x = source
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.trunc_().clamp_(0, 255)  # PIL's bilinear transform truncates (measured: rounding misses 45%)
    keep = _inside(u, v, w, h).all(1, keepdim=True)
    return torch.where(keep, out, _on(fill, out.device, out.dtype).view(1, -1, 1, 1))


# ----------------------------------------------------------------------------------------- photometric
def _col(values: Sequence[float], x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return _on(values, x.device, dtype).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (degenerate + f * (x - degenerate)).trunc_().clamp_(0, 255)  # PIL: float blend, (int) truncates


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L (ITU-R 601 in 16-bit fixed point) of (n, 3, h, w), as (n, 1, h, w)."""
    i = x.to(torch.int64)
    return ((i[:, 0] * 19595 + i[:, 1] * 38470 + i[:, 2] * 7471 + 0x8000) >> 16).to(x.dtype)[:, None]


def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-view, per-channel LUTs (n, 3, 256) applied to (n, 3, h, w)."""
    n, c, h, w = x.shape
    return torch.gather(lut.to(x.dtype), 2, x.to(torch.int64).view(n, c, -1)).view(n, c, h, w)


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, 256) counts of each 8-bit value per view and channel, one scatter-add for the batch."""
    n, c = x.shape[:2]
    idx = x.to(torch.int64).view(n * c, -1) + 256 * torch.arange(n * c, device=x.device)[:, None]
    # a scatter into a known size: torch.bincount sizes its output from the input's max, a sync on a GPU
    counts = torch.zeros(256 * n * c, dtype=torch.int64, device=x.device)
    return counts.scatter_add_(0, idx.flatten(), torch.ones_like(idx).flatten()).view(n, c, 256)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    # ImageOps.autocontrast (cutoff 0): lut[i] = int(i * 255 / (hi - lo) - lo * 255 / (hi - lo)), clipped
    lo = x.amin((2, 3), keepdim=True).to(torch.float64)
    hi = x.amax((2, 3), keepdim=True).to(torch.float64)
    scale = 255.0 / (hi - lo).clamp_(min=1)
    out = (x.to(torch.float64) * scale + (-lo * scale)).trunc_().clamp_(0, 255).to(x.dtype)
    return torch.where(hi > lo, out, x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    # ImageOps.equalize: step = (pixels - count of the last used value) // 255, lut[i] = (step // 2 + cdf(i-1)) // step
    hist = _histograms(x)
    last = 255 - (hist > 0).flip(-1).to(torch.int64).argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    cdf = torch.cat([hist.new_zeros(hist.shape[:2] + (1,)), hist.cumsum(-1)[..., :-1]], -1)
    lut = torch.div(step // 2 + cdf, step.clamp(min=1), rounding_mode="floor").clamp_(max=255)
    ramp = torch.arange(256, device=x.device).expand_as(lut)
    return _lut(x, torch.where((step > 0) & ((hist > 0).sum(-1, keepdim=True) > 1), lut, ramp))


def _smooth(x: torch.Tensor) -> torch.Tensor:
    k = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    k[:, :, 1, 1] = 5
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = _round8(F.conv2d(x, k / 13.0, groups=3))  # PIL's 3x3 filters copy the border
    return out


def photometric(x: torch.Tensor, name: str, args: Sequence[float], stats: torch.Tensor | None = None) -> torch.Tensor:
    """One RandAugment colour op (or colour-jitter factor) on n views (n, 3, h, w) of 8-bit values, each
    with its own argument; PIL's 8-bit arithmetic, so the tensor path stays within a level of the PIL one.
    Contrast takes its mean from `stats` when given (a composed view: the unrotated crop)."""
    if name == "Identity":
        return x
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Solarize":
        return torch.where(x < _col([int(round(a)) for a in args], x), x, 255 - x)
    if name == "Posterize":
        mask = _col([~(2 ** (8 - int(round(a))) - 1) & 0xFF for a in args], x, torch.int64)
        return (x.to(torch.int64) & mask).to(x.dtype)
    f = _col(args, x)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, f)
    if name == "Contrast":  # the mean of the L image, rounded as ImageEnhance.Contrast does
        ref = x if stats is None else stats
        mean = (_luma(ref).to(torch.float64).mean((1, 2, 3), keepdim=True) + 0.5).floor_().to(x.dtype)
        return _blend(mean.expand_as(x), x, f)
    if name == "Color":
        return _blend(_luma(x).expand_as(x), x, f)
    if name == "Sharpness":
        return _blend(_smooth(x), x, f)
    raise ValueError(f"unknown photometric op {name!r}")


_JITTER_NAMES = ("Brightness", "Contrast", "Color")


# ------------------------------------------------------------------------------------------- rendering
def _stages(p: np.ndarray, steps: Sequence[tuple[str, object]]) -> tuple[dict[int, tuple[str, object]], list[int]]:
    """A view's `kt.render.plan` keyed by stage: 0 flip, 1-3 the jitter positions, 4 + k RandAugment slot k
    (an affine run sits at the slot of its first op); and the stage of each step. Views then line up stage
    by stage, so a batch runs each (stage, op) once for all the views that have it, in every view's order."""
    out: dict[int, tuple[str, object]] = {}
    at: list[int] = []
    slot = 4
    order = JITTER_ORDERS[int(round(p[8]))]
    for kind, arg in steps:
        if kind == "flip":
            at.append(0)
            out[0] = ("flip", None)
        elif kind == "jitter":
            at.append(1 + order.index(arg))
            out[at[-1]] = (_JITTER_NAMES[arg], float(p[5 + arg]))
        elif kind == "affine":
            matrix, clips = arg
            at.append(slot)
            out[slot] = ("affine", [matrix, *clips])
            slot += 1 + len(clips)
        else:
            at.append(slot)
            out[slot] = arg
            slot += 1
    return out, at


def _maps(args: Sequence[Sequence[Affine]]) -> np.ndarray:
    """Each view's list of maps as one (n, K, 6) array, padded with identities (which keep every pixel)."""
    k = max(len(a) for a in args)
    maps = np.tile(np.array([1, 0, 0, 0, 1, 0], dtype=np.float64), (len(args), k, 1))
    for j, a in enumerate(args):
        maps[j, : len(a)] = a
    return maps


def render_batch(sources: Sequence[torch.Tensor], params, size: int | tuple[int, int],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """Views params[i] of sources[i] as (N, 3, h, w): uint8, or normalised float32 given mean and std.

    One crop-resize for the batch, then each stage of the views' plans as one batched op per kind of step
    (one `grid_sample` for every view whose step there is a geometric run): the kernel count depends on the
    ops present, not on N. Where `kt.render` joins the crop to the first geometric run (`joined_run`), so
    does this path: those views are sampled from the source in one `grid_sample` up front (`g`), the
    steps before the run go through both `g` and the crop (which gives Contrast its mean), and at the run
    `g`, refilled, takes the crop's place."""
    params = np.asarray(params, dtype=np.float32).reshape(len(sources), -1)
    ps = [as_params(p) for p in params]
    w, h = out_size(size)
    plans = [plan(p, w, h) for p in ps]
    staged = [_stages(p, steps) for p, steps in zip(ps, plans)]
    stages = [st for st, _ in staged]
    joined: dict[int, tuple[int, Affine]] = {}  # view -> (stage of its joined run, source map of the run)
    for i, (s, p, steps) in enumerate(zip(sources, ps, plans)):
        W, H = s.shape[2], s.shape[1]
        x0, y0, x1, y1 = crop_box(p)
        crop = ((x1 - x0) * W / w, 0.0, x0 * W, 0.0, (y1 - y0) * H / h, y0 * H)  # kt.render.crop_map
        j = joined_run(steps, crop)
        if j is not None:
            joined[i] = (staged[i][1][j], compose(crop, steps[j][1][0]))
    device_type = sources[0].device.type
    # the render emulates PIL's 8-bit arithmetic in float32: never under a caller's mixed-precision autocast
    no_autocast = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext()
    with torch.no_grad(), no_autocast:
        src = _sources(sources)
        x = crop_resize(src, sources, ps, (w, h))
        rows = {i: r for r, i in enumerate(sorted(joined))}
        if joined:
            jsel = _on(sorted(joined), x.device)
            g = affine(x[jsel], _maps([stages[i][joined[i][0]][1] for i in sorted(joined)]), FILL,
                       source=src[jsel].to(torch.float32), first=np.array([joined[i][1] for i in sorted(joined)]))
        for stage in sorted({s for st in stages for s in st}):
            groups: dict[str, list[int]] = {}
            for i, st in enumerate(stages):
                if stage in st:
                    groups.setdefault(st[stage][0], []).append(i)
            for name, idx in groups.items():
                sel = _on(idx, x.device)
                args = [stages[i][stage][1] for i in idx]
                if name == "flip":
                    y = x[sel].flip(-1)
                elif name == "affine":
                    y = affine(x[sel], _maps(args), FILL)
                    mine = [k for k, i in enumerate(idx) if i in joined and joined[i][0] == stage]
                    if mine:  # the joined run: the composed sample, refilled where the run's maps clip
                        at = _on([rows[idx[k]] for k in mine], x.device)
                        keep = _keep(_maps([args[k] for k in mine]), h, w, x.device)
                        fill = _col(FILL, x).view(1, 3, 1, 1)
                        y[_on(mine, x.device)] = torch.where(keep, g[at], fill)
                else:
                    pre = [k for k, i in enumerate(idx) if i in joined and stage < joined[i][0]]
                    if pre:  # before a joined run: the same step on the composed sample, Contrast's mean from the crop
                        at = _on([rows[idx[k]] for k in pre], x.device)
                        g[at] = photometric(g[at], name, [args[k] for k in pre], stats=x[sel[pre]])
                    y = photometric(x[sel], name, args)
                x = x.index_copy(0, sel, y) if len(idx) < len(x) else y
        if mean is None or std is None:
            return x.to(torch.uint8)
        return normalize(x, mean, std)


def render_device_for(choice: str, device: torch.device | str | None = None) -> torch.device | None:
    """`--render` of `kt-cache build` and `kt-student train`: the device that renders views in the main process,
    the model's (None: the DataLoader workers render with PIL). `device` is this process's device; by default
    the first CUDA device when there is one."""
    if choice not in ("auto", "cpu", "cuda"):
        raise UserError(f"--render must be auto, cpu or cuda, got {choice!r}")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    # `auto` keeps the PIL workers. Measured on an H200 (docs/benchmarks.md, "The build on a GPU host"): the
    # batched tensor render makes 1,500-2,300 train views/s at 224 px for ~0.5 host-CPU ms a view, but that host
    # work runs in the main thread, which bounds the build: a ViT-L/14 build ran 669 views/s with it against
    # 1,220 with 8 PIL workers. The student stream has the same shape (workers decode, the main thread
    # renders). `cuda` stays one flag away.
    if choice in ("cpu", "auto"):
        return None
    if device.type != "cuda":
        raise UserError("--render cuda: this process has no CUDA device (use --render auto or cpu)")
    return device
