"""Rendering a stored view on the CPU (PIL): source image + parameter vector -> pixels at any size.

The parameters (`kt.views.sample_params`) are size-free; this module turns them into pixels, paying for
the output rather than the input:

- `decode_for_views` decodes a JPEG at reduced scale (PIL `draft`, libjpeg's DCT scaling) when every view
  asked of it still gets at least `DRAFT_MARGIN` source pixels per output pixel along each axis, so a 64 px
  student view of a 500x375 photo decodes a quarter of the pixels (1/2 scale); the crop box is placed in
  the reduced image's own pixels (`logical_size`). Below that margin a reduced decode would drop detail
  the full decode keeps. (It saves 10-40% of the decode: libjpeg's entropy decoding, which scaling
  cannot skip, dominates.)
- Geometry, one resample where the output allows it (`joined_run`): a view with rotate/shear/translate
  whose crop shrinks by at most `COMPOSE_MAX_SHRINK` (1.7: 64% of `train` views at 224 px of a 500x375
  photo) is ONE bilinear `transform` of the source at the output size: crop, flip and the first run of
  geometric ops composed into one affine map, the reference's fill restored by nearest-transformed keep
  masks. The colour steps that came before the run in the reference order run after it: pointwise ops
  commute with the geometry, Contrast takes its mean from a 64 px nearest proxy of the unrotated crop (a
  mean over the rotated view misses what the run moved out of the frame: up to 6/255 measured), and the
  fill is restored after them, as they never saw it. A histogram op (AutoContrast, Equalize) before the
  run keeps the two-step path: its table depends on the whole crop.
- A crop that shrinks more is resized first (PIL's antialiased bicubic with `box`; `reducing_gap` 3: PIL
  box-reduces first beyond 3x), then each run of geometric ops is one `transform` at the output size. One
  bilinear resample of a strongly shrunk source aliases: MAD 2.3/255 against the reference at 64 px, even
  after a `reduce()` (measured), and PIL's generic `transform` does not antialias when it shrinks.
- An RGB bilinear `transform` of at least 96x96 output pixels runs through OpenCV (`cv2.warpAffine` on
  float32, truncated, PIL's edge and fill rules: `_warp_bilinear`): PIL's result to ~1 pixel in 10,000, at
  1.3-3.2x its speed; PIL keeps smaller ones, warps that read more than 3x their pixels, and every warp
  where OpenCV is not installed.
- Colour at the output size: brightness, contrast, solarize and posterize as 256-entry tables through the
  core's `point` (PIL's blend arithmetic, bit for bit, ~3x cheaper than a blend); Color, Sharpness,
  AutoContrast and Equalize through PIL.

Where the time goes now (see docs/benchmarks.md, "Data path"): at 224 px the JPEG decode (~0.8 ms), PIL's
antialiased bicubic resize (~0.7-1.3 ms, not vectorised; nothing else computes it with a fractional box:
torch's uint8 kernel is PIL's algorithm but takes no offset), or the OpenCV warp (~0.45 ms), colour jitter
(~0.4 ms): a per-view CPU render does not reach 1,000 views/s per core; the batched tensor path
(`kt.render_tensor`) is the route there.

Renders differ from the first implementation (view format version 1, kept as `kt.render_v1`) where the
crop joins a run (one resample instead of two), where a JPEG is decoded at reduced scale, where PIL
box-reduces first, and in ~1 pixel in 10,000 of a geometric op's warp (OpenCV's float32 arithmetic). Over
the test set of views (tests/test_render_equivalence.py: train/light/eval specs, 224/64/48x32 px, JPEG and
PNG photos) the mean absolute difference per group is <= 0.69/255 (0.21/255 on
average at 224 px), inside the 1/255 budget; single views differ by up to ~7.5/255 where a threshold op
(solarize, posterize) turns a one-level difference into a large one. Views without a geometric op are
bit for bit the same where nothing was reduced (also tested).

The view format version stays 1. The stored parameters, their meaning and `sample_params` are unchanged
(bit-identical; also tested), and a pixel difference of that size is far inside what `kt-cache verify`
tolerates (teacher outputs on the replayed view against the cached ones, at codec fidelity): caches built
before still verify (tests/test_compat.py verifies a cache written by an earlier kt against its teacher
with these renders). Bumping the version would have changed every spec's fingerprint, which keys the view
generator, and so every stored parameter: the opposite of what a render speed-up may do; refusing old
caches would throw away teacher hours for a sub-level pixel difference. `kt.render_v1` stays importable
so the claim can be re-checked against the first renders at any time.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageChops, ImageEnhance, ImageOps

from kt.views import (_MIX, GEOMETRIC_OPS, JITTER_ORDERS, MAX_OPS, PARAM_DIM, RANDAUG_OPS, _OPS_START, base_params,
                      mix_mode)

FILL = (128, 128, 128)  # grey for pixels that rotate/shear/translate bring in from outside the image
COMPOSE_MAX_SHRINK = 1.7  # `joined_run`; worst group MAD 0.69/255 (2.3: 0.82, 64 px views alias more)
REDUCING_GAP = 3.0  # PIL box-reduces a crop shrunk > 3x first: its resize 5-50% cheaper, MAD <= 0.18/255 (2.0: 0.35)
# OpenCV warps an RGB bilinear transform (`transform`) from this output size up, while the source region it
# reads is at most WARP_MAX_SOURCE times the output: below, PIL's per-output-pixel transform is as cheap
# (measured: 1.3-2.3x faster from 96 px at shrinks <= 1.7, even at 48 px, slower at 2.5x shrink)
WARP_MIN_PIXELS = 96 * 96
WARP_MAX_SOURCE = 3.0
PROXY_SIZE = 64  # side of the nearest-neighbour crop a composed view takes Contrast's mean from
DRAFT_MARGIN = 2.0  # source px per output px a reduced JPEG decode keeps: MAD <= 0.4/255 measured (1.5: 1.5/255)
_LOGICAL = "kt_logical_size"  # Image.info key: the decoded image's extent in its own pixels (draft box)


# ------------------------------------------------------------------------------------------ parameters
def out_size(size: int | tuple[int, int]) -> tuple[int, int]:
    w, h = (size, size) if isinstance(size, (int, np.integer)) else size
    if int(w) < 1 or int(h) < 1:
        raise ValueError(f"output size must be positive, got {size!r}")
    return int(w), int(h)


def as_params(params) -> np.ndarray:
    p = np.asarray(params, dtype=np.float32).astype(np.float64)
    if p.shape != (PARAM_DIM,):
        raise ValueError(f"view parameters must have shape ({PARAM_DIM},), got {p.shape}")
    return p


def ops(p: np.ndarray) -> list[tuple[str, float]]:
    """The RandAugment ops of a parameter vector, in order, as (name, argument)."""
    out = []
    for k in range(MAX_OPS):
        op = int(round(p[_OPS_START + 2 * k]))
        if op >= 0:
            out.append((RANDAUG_OPS[op], float(p[_OPS_START + 2 * k + 1])))
    return out


def crop_box(p: np.ndarray) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(np.clip(v, 0.0, 1.0)) for v in p[0:4])
    return x0, y0, x1, y1


# -------------------------------------------------------------------------------------------- geometry
Affine = tuple[float, float, float, float, float, float]  # PIL order: output (x, y) -> input (ax+by+c, dx+ey+f)


def op_matrix(name: str, arg: float, w: int, h: int) -> Affine:
    """The output->input map of one geometric op on a w x h image, as the reference applies it.

    Rotate is PIL's own `Image.rotate` matrix (about the centre, 15-digit rounded), so that a single op
    renders bit for bit as before."""
    if name == "Rotate":
        a = -math.radians(arg % 360.0)
        c, s = round(math.cos(a), 15), round(math.sin(a), 15)
        cx, cy = w / 2, h / 2
        return (c, s, c * -cx + s * -cy + cx, -s, c, -s * -cx + c * -cy + cy)
    if name == "ShearX":
        return (1, arg, -arg * h / 2, 0, 1, 0)
    if name == "ShearY":
        return (1, 0, 0, arg, 1, -arg * w / 2)
    if name == "TranslateX":
        return (1, 0, arg * w, 0, 1, 0)
    if name == "TranslateY":
        return (1, 0, 0, 0, 1, arg * h)
    raise ValueError(f"not a geometric op: {name}")


def compose(first: Affine, then: Affine) -> Affine:
    """The map of applying transform `first` to the image, then `then`: input = first(then(output))."""
    a, b, c, d, e, f = first
    A, B, C, D, E, F = then
    return (a * A + b * D, a * B + b * E, a * C + b * F + c, d * A + e * D, d * B + e * E, d * C + e * F + f)


def flip_matrix(w: int) -> Affine:
    return (-1, 0, w, 0, 1, 0)


def plan(p: np.ndarray, w: int, h: int) -> list[tuple[str, object]]:
    """The render as steps after the crop-resize: ("flip", None), ("jitter", s), ("photo", (name, arg)) and
    ("affine", (matrix, clips)) for a run of consecutive geometric ops.

    The flip is folded into the first geometric run when there is one (it commutes exactly with the jitter
    and photometric ops before it: all are pointwise, histogram or symmetric-kernel operations). A run's
    `clips` are the maps output -> input of each op but the first: in the reference every op fills what
    falls outside ITS frame, so a composed pixel is kept only where every intermediate map lands in the
    frame too (two opposite translations leave grey bands, not the original image)."""
    steps: list[tuple[str, object]] = []
    flip = p[4] >= 0.5
    for s in JITTER_ORDERS[int(round(p[8]))]:
        if p[5 + s] != 1.0:
            steps.append(("jitter", s))
    run: list[Affine] = []

    def close_run() -> None:
        # partial maps A_k o ... o A_n for k >= 2; the whole composition is the first op's map then these
        partials: list[Affine] = []
        for m in reversed(run[1:]):
            partials.insert(0, compose(m, partials[0]) if partials else m)
        matrix = compose(run[0], partials[0]) if partials else run[0]
        steps.append(("affine", (matrix, partials)))
        run.clear()

    for name, arg in ops(p):
        if name in GEOMETRIC_OPS:
            m = op_matrix(name, arg, w, h)
            if not run and flip:
                m, flip = compose(flip_matrix(w), m), False
            run.append(m)
            continue
        if run:
            close_run()
        steps.append(("photo", (name, arg)))
    if run:
        close_run()
    if flip:
        steps.insert(0, ("flip", None))
    return steps


def keep_mask(maps: Sequence[Affine], w: int, h: int) -> Image.Image | None:
    """An L mask (255 = keep) of the output pixels whose centres every map sends into the w x h frame.

    Each map is a nearest-neighbour `transform` of an all-255 image filled with 0: PIL's own fill rule, 25x
    cheaper than testing the centres with numpy."""
    if not maps:
        return None
    ones = Image.new("L", (w, h), 255)
    keep = None
    for m in maps:
        inside = ones.transform((w, h), Image.Transform.AFFINE, m, resample=Image.Resampling.NEAREST, fillcolor=0)
        keep = inside if keep is None else ImageChops.darker(keep, inside)
    return keep


def transform(img: Image.Image, size: tuple[int, int], matrix: Affine, resample: int, fill) -> Image.Image:
    """PIL's affine `transform`: output pixel centre (x, y) + 0.5 -> input (ax+by+c, dx+ey+f), `fill` where that
    falls outside the frame. An RGB bilinear one runs through OpenCV instead (`_warp_bilinear`): the same
    pixels, ~3x faster."""
    if resample == Image.Resampling.BILINEAR and img.mode == "RGB" and size[0] * size[1] >= WARP_MIN_PIXELS:
        out = _warp_bilinear(img, size, matrix, fill, max_source=WARP_MAX_SOURCE)
        if out is not None:
            return out
    return img.transform(size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


_CV2: list = []  # [module or None] once looked up


def _cv2():
    """OpenCV, imported on first use (0.1 s) and held to one thread (a render is one small image, run in a
    DataLoader worker that is itself one of many; cv2's own pool would oversubscribe the cores), or None
    where it does not import: a declared dependency, but only a speed-up, so a machine without it (a lent
    GPU box whose wheels are carried in) renders the same views through PIL."""
    if not _CV2:
        try:
            import cv2

            cv2.setNumThreads(1)
        except ImportError:
            cv2 = None
        _CV2.append(cv2)
    return _CV2[0]


@functools.lru_cache(maxsize=8)
def _solid(w: int, h: int, colour: tuple[int, int, int]) -> np.ndarray:
    """A read-only h x w RGB image of one colour (np.full with a tuple broadcasts slowly: 0.19 ms at 224 px)."""
    out = np.empty((h, w, 3), np.uint8)
    out[...] = np.asarray(colour, np.uint8)
    out.flags.writeable = False
    return out


def _warp_bilinear(img: Image.Image, size: tuple[int, int], matrix: Affine, fill,
                   max_source: float = math.inf) -> Image.Image | None:
    """PIL's bilinear affine `transform` of an RGB image, reproduced with `cv2.warpAffine`: ~0.6 instead of
    ~1.1 ms at 224 px (PIL's generic transform is not vectorised). Against PIL on photos, ~1 pixel in 10,000
    differs, by one level (tests/test_render_equivalence.py).

    Why not cv2's uint8 warp alone: it rounds in fixed point where PIL interpolates in floating point and
    truncates, +0.3/255 on average, so the source goes through as float32 and the result is truncated. PIL
    clamps a sample's neighbours at the frame's edge (BORDER_REPLICATE) and fills a pixel whose centre maps
    outside the frame: a nearest warp of the frame, the same rule (cv2 rounds the centre, PIL floors the
    edge coordinate), taken only when a corner of the output maps outside (the frame is convex, so four
    corners inside mean every pixel is).

    None, for PIL to do it, when the source pixels the output reads outnumber its own by more than
    `max_source` (PIL's cost follows the output's pixels, OpenCV's the source region's too), or when
    OpenCV is not installed."""
    w, h = size
    W, H = img.size
    a, b, c, d, e, f = matrix
    # cv2 maps pixel centres to pixel centres (src = M (x, y), centres at integers); PIL maps the output's
    # centre (x + 0.5, y + 0.5) to edge coordinates
    m = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]])
    cx = [m[0, 0] * x + m[0, 1] * y + m[0, 2] for x in (0, w - 1) for y in (0, h - 1)]
    cy = [m[1, 0] * x + m[1, 1] * y + m[1, 2] for x in (0, w - 1) for y in (0, h - 1)]
    # only the source pixels the samples can touch go to float32 (2 px of margin for the neighbours)
    x0 = min(max(math.floor(min(cx)) - 2, 0), W - 1)
    y0 = min(max(math.floor(min(cy)) - 2, 0), H - 1)
    x1 = max(min(math.ceil(max(cx)) + 3, W), x0 + 1)
    y1 = max(min(math.ceil(max(cy)) + 3, H), y0 + 1)
    cv2 = _cv2() if (x1 - x0) * (y1 - y0) <= max_source * w * h else None
    if cv2 is None:
        return None
    src = np.asarray(img.crop((x0, y0, x1, y1)) if (x0, y0, x1, y1) != (0, 0, W, H) else img, dtype=np.float32)
    shifted = m - np.array([[0, 0, x0], [0, 0, y0]])
    out = cv2.warpAffine(src, shifted, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE).astype(np.uint8)  # truncates, as PIL does
    if not (min(cx) >= -0.5 and max(cx) < W - 0.5 and min(cy) >= -0.5 and max(cy) < H - 0.5):
        outside = cv2.warpAffine(np.zeros((H, W), np.uint8), m, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=255)
        cv2.copyTo(_solid(w, h, tuple(fill)), outside, out)
    return Image.fromarray(out, "RGB")


def apply_affine(img: Image.Image, matrix: Affine, clips: Sequence[Affine], resample: int, fill) -> Image.Image:
    """One resample for a run of geometric ops, with the reference's fill wherever any op of it clipped."""
    out = transform(img, img.size, matrix, resample, fill)
    keep = keep_mask(clips, *img.size)
    if keep is None:
        return out
    return Image.composite(out, Image.new(out.mode, out.size, fill), keep)


# -------------------------------------------------------------------------------------------- decoding
def decode_for_views(data: bytes, params, size: int | tuple[int, int], margin: float = DRAFT_MARGIN) -> Image.Image:
    """Decode image bytes for rendering the view(s) `params` ((P,) or (N, P)) at `size`.

    JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps `margin` source pixels per output
    pixel for every view; the image records its full-resolution extent so `render` places the normalised
    crop box exactly. Other formats decode fully. Truncated data raises, as a full decode does."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        # plain floats: a handful of numpy calls on 4-element rows cost 10% of a 224 px view's decode
        rows = np.asarray(params, dtype=np.float64)[..., :4].reshape(-1, 4).tolist()  # crop boxes, any spec
        ow, oh = out_size(size)
        W, H = img.size
        # the narrowest crop, in full-resolution pixels, over all views asked for
        cw = min(min(max(x1, 0.0), 1.0) - min(max(x0, 0.0), 1.0) for x0, _, x1, _ in rows) * W
        ch = min(min(max(y1, 0.0), 1.0) - min(max(y0, 0.0), 1.0) for _, y0, _, y1 in rows) * H
        scale = next((s for s in (8, 4, 2) if cw / s >= margin * ow and ch / s >= margin * oh
                      and W // s and H // s), 1)
        if scale > 1:
            mode = "L" if img.mode == "L" else "RGB"
            drafted = img.draft(mode, (W // scale, H // scale))
            if drafted is not None:
                img.info[_LOGICAL] = drafted[1][2:]
    img.load()
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    return img


def logical_size(img: Image.Image) -> tuple[float, float]:
    """Extent of the full image in `img`'s pixels: its size, or W/s x H/s after a reduced decode."""
    return img.info.get(_LOGICAL, img.size)


# ------------------------------------------------------------------------------------------- rendering
def crop_map(img: Image.Image, p: np.ndarray, size: tuple[int, int]) -> Affine:
    """Output pixel -> source pixel map of the crop box resized to `size` (PIL's `resize(box=...)` geometry)."""
    W, H = logical_size(img)
    x0, y0, x1, y1 = crop_box(p)
    w, h = size
    return ((x1 - x0) * W / w, 0.0, x0 * W, 0.0, (y1 - y0) * H / h, y0 * H)


def joined_run(steps: Sequence[tuple[str, object]], crop: Affine) -> int | None:
    """Index in `steps` (a `plan`) of the geometric run the crop joins, or None: the first run, while the crop
    shrinks by at most `COMPOSE_MAX_SHRINK` (one bilinear resample of the source still reads every pixel,
    without aliasing) and no histogram op (AutoContrast, Equalize: their tables depend on the whole crop)
    comes before it. The rule of both renders (`kt.render_tensor` too)."""
    first = next((i for i, (kind, _) in enumerate(steps) if kind == "affine"), None)
    if first is None or max(crop[0], crop[4]) > COMPOSE_MAX_SHRINK:
        return None
    if any(kind == "photo" and arg[0] in _HISTOGRAM_OPS for kind, arg in steps[:first]):  # type: ignore[index]
        return None
    return first


def _crop(img: Image.Image, p: np.ndarray, size: tuple[int, int], resample: int) -> Image.Image:
    """Crop and resize in one step, so a fractional box shows the same region at any output size."""
    W, H = logical_size(img)
    x0, y0, x1, y1 = crop_box(p)
    return img.resize(size, resample=resample, box=(x0 * W, y0 * H, x1 * W, y1 * H), reducing_gap=REDUCING_GAP)


def _geometry(img: Image.Image, p: np.ndarray, size: tuple[int, int], crop_resample: int, resample: int, fill,
              colour: bool = True):
    """The crop, alone or composed with the first geometric run: (image, steps left, how many of them came
    before the run, keep mask or None, statistics proxy or None).

    Composed, the steps that came before the run (colour jitter, photometric ops) run after it; the fill is
    restored after them, since in the reference they never saw it, and Contrast takes its mean from a
    small nearest-neighbour proxy of the unrotated crop that goes through the same steps (a masked mean of
    the rotated view misses what the run moved out of the frame: up to 6/255 measured)."""
    steps = plan(p, *size)
    crop = crop_map(img, p, size)
    first = joined_run(steps, crop)
    if first is None:
        return _crop(img, p, size, crop_resample), steps, 0, None, None
    matrix, clips = steps[first][1]
    out = transform(img, size, compose(crop, matrix), resample, fill)
    keep = keep_mask([matrix, *clips], *size)
    proxy = None
    if colour and any(kind == "jitter" and arg == 1 or kind == "photo" and arg[0] == "Contrast"  # type: ignore[index]
                      for kind, arg in steps[:first]):
        proxy = _crop(img, p, (min(size[0], PROXY_SIZE), min(size[1], PROXY_SIZE)), Image.Resampling.NEAREST)
    return out, steps[:first] + steps[first + 1:], first, keep, proxy


_HISTOGRAM_OPS = frozenset({"AutoContrast", "Equalize"})
_JITTER_NAMES = ("Brightness", "Contrast", "Color")


def _point(img: Image.Image, table: np.ndarray) -> Image.Image:
    """`img` through one 256-entry table per band. The table goes to the core's `point` directly:
    `Image.point` rounds each of its 768 entries in Python (0.4 ms, more than the op itself)."""
    img.load()
    return img._new(img.im.point(table.astype(np.uint8).tolist() * len(img.getbands()), None))


def _blend_lut(img: Image.Image, degenerate: float, f: float) -> Image.Image:
    """PIL's `Image.blend(constant degenerate, img, f)` as a 256-entry table (the same float32 arithmetic,
    then truncation and clipping), one table pass instead of a blend: 4x cheaper."""
    a = np.float32(degenerate)
    return _point(img, np.clip(a + np.float32(f) * (np.arange(256, dtype=np.float32) - a), 0, 255))


def _photometric(img: Image.Image, name: str, arg: float, stats: Image.Image | None = None) -> Image.Image:
    """One colour op (RandAugment or a jitter factor); Contrast's mean from `stats` when given."""
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Solarize":
        ramp = np.arange(256)  # ImageOps.solarize's table: invert at or above the threshold
        return _point(img, np.where(ramp < int(round(arg)), ramp, 255 - ramp))
    if name == "Posterize":  # ImageOps.posterize's table: keep the top bits
        return _point(img, np.arange(256) & (~(2 ** (8 - int(round(arg))) - 1) & 0xFF))
    if name == "Brightness":
        return _blend_lut(img, 0, arg)
    if name == "Contrast":  # ImageEnhance.Contrast: towards the rounded mean of the L image
        hist = np.asarray((img if stats is None else stats).convert("L").histogram(), dtype=np.float64)
        mean = int(float(hist @ np.arange(256)) / max(float(hist.sum()), 1.0) + 0.5)
        return _blend_lut(img, mean, arg)
    if name == "Color":
        return ImageEnhance.Color(img).enhance(arg)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(arg)
    raise ValueError(f"unknown photometric op {name!r}")


def render(image: Image.Image, params: np.ndarray, size: int | tuple[int, int]) -> Image.Image:
    """The view described by `params` of `image`, RGB at `size` (an int for square, or (width, height)).

    `image` is a decoded image, or one from `decode_for_views` (possibly at reduced scale)."""
    p = as_params(params)
    size = out_size(size)
    img = image if image.mode == "RGB" else image.convert("RGB")
    if img is not image and _LOGICAL in image.info:
        img.info[_LOGICAL] = image.info[_LOGICAL]
    out, steps, before, keep, proxy = _geometry(img, p, size, Image.Resampling.BICUBIC,
                                                Image.Resampling.BILINEAR, FILL)
    # At this point we have the view's geometry at output size (or the crop alone); the rest is per pixel.
    for i, (kind, arg) in enumerate(steps):
        if i == before and keep is not None:  # the composed run's fill, which no earlier step touched
            out = Image.composite(out, Image.new("RGB", size, FILL), keep)
        if kind == "flip":
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif kind == "affine":
            out = apply_affine(out, *arg, Image.Resampling.BILINEAR, FILL)
        else:
            name, value = (_JITTER_NAMES[arg], float(p[5 + arg])) if kind == "jitter" else arg
            stats = proxy if i < before else None
            out = _photometric(out, name, value, stats)
            if stats is not None:
                proxy = _photometric(proxy, name, value)
    if keep is not None and before == len(steps):
        out = Image.composite(out, Image.new("RGB", size, FILL), keep)
    return out


def render_view(image: Image.Image, params: np.ndarray, size: int | tuple[int, int],
                partner: Image.Image | None = None, partner_params: np.ndarray | None = None) -> Image.Image:
    """A view of any spec: `render` of its base view and, where it mixes (`kt.views.mix_mode`), its partner's own
    view (`partner_params`, the partner's vector for the same view index) rendered at the same size and mixed in:
    MixUp blends the two (PIL `Image.blend`, the sample's own view weighted lam), CutMix pastes the partner's
    pixels inside the stored box. Both are taken at the output size, so the teacher's and the student's renders
    of one mixed view show the same mix."""
    p = np.asarray(params, dtype=np.float32)
    view = render(image, base_params(p), size)
    mode = mix_mode(p)
    if mode == "none":
        return view
    if partner is None or partner_params is None:
        raise ValueError("a mixed view needs its partner's image and view parameters")
    other = render(partner, base_params(partner_params), size)
    if mode == "mixup":
        return Image.blend(other, view, float(p[_MIX + 1]))
    w, h = out_size(size)
    x0, y0, x1, y1 = (float(v) for v in p[_MIX + 3:_MIX + 7])
    box = (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))
    if box[2] > box[0] and box[3] > box[1]:
        view.paste(other.crop(box), box[:2])
    return view


def render_mask(mask: Image.Image, params: np.ndarray, size: int | tuple[int, int], fill: int = 255) -> Image.Image:
    """The geometric part of `render` on a label mask, nearest-neighbour so no new labels appear.

    The same steps as `render` (same crop box, the same composed affine maps, the crop joined to the first
    run under the same rule), so masks and images stay aligned. Pixels brought in from outside by
    rotate/shear/translate get `fill` (255, the usual ignore index)."""
    p = as_params(params)
    size = out_size(size)
    out, steps, _, keep, _ = _geometry(mask, p, size, Image.Resampling.NEAREST, Image.Resampling.NEAREST, fill,
                                       colour=False)
    if keep is not None:
        out = Image.composite(out, Image.new(out.mode, size, fill), keep)
    for kind, arg in steps:
        if kind == "flip":
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif kind == "affine":
            out = apply_affine(out, *arg, Image.Resampling.NEAREST, fill)
    return out


def render_valid(params: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(h, w) bool, True where the view at `size` shows the image and False where rotate/shear/translate brought
    in fill: `render_mask` of an all-valid mask, so it is the same geometry as `render` by construction.

    The crop box is normalised and a constant mask crops to a constant, so the source's size does not matter
    and an output-size mask stands in for it."""
    w, h = out_size(size)
    return np.asarray(render_mask(Image.new("L", (w, h), 1), params, (w, h), fill=0), dtype=bool)


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]):
    """A rendered RGB view as a normalised float tensor (3, H, W): the model input; `normalize(to_uint8(image))`."""
    return normalize(to_uint8(image), mean, std)


def to_uint8(image: Image.Image):
    """A rendered RGB view as a contiguous uint8 tensor (3, H, W): what DataLoader workers send to a GPU
    consumer, a quarter of the float view's bytes through shared and pinned memory, normalised on the device
    (as timm's PrefetchLoader does)."""
    import torch

    # numpy's transposing copy: 0.04 ms at 224 px, against 0.15 ms for torch's permute().contiguous() on uint8
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


# Where DataLoader workers send the rendered views' uint8 values for their consumer to `normalize` on its device
# (a quarter of the bytes through shared and pinned memory, as timm's PrefetchLoader does): "cuda" (toward a
# CUDA model; toward a CPU one the float views stay in the workers), "always" or "never". The one switch for the
# build, the student stream, finetuning and evaluation; benchmarks and tests set it. Either way the model sees the
# same input bit for bit: normalize(to_uint8(view)) is to_tensor(view).
UINT8_VIEWS = "cuda"


def uint8_views(device) -> bool:
    """Whether the workers feeding a model on `device` send uint8 views (`UINT8_VIEWS`)."""
    import torch

    return UINT8_VIEWS == "always" or UINT8_VIEWS == "cuda" and torch.device(device).type == "cuda"


def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """uint8 views (..., 3, H, W) as the normalised float32 model input, on their own device.

    One multiply-add per element, x * 1/(255 std) - mean/std: 5-10x faster than the per-step division it
    replaced, equal to it within float32 rounding (~1e-7). The same two IEEE float32 operations on every
    device, so a view normalised on a GPU equals one normalised in a CPU worker bit for bit."""
    import torch

    s = torch.tensor(std, dtype=torch.float64)
    # non_blocking: a blocking copy to a GPU synchronises its stream first, so the host would wait here for
    # the teacher's forward queued before (the build keeps one batch in flight); from pageable memory the
    # copy is staged at once and stays safe
    scale = (1.0 / (255.0 * s)).to(torch.float32).view(3, 1, 1)
    shift = (torch.tensor(mean, dtype=torch.float64) / s).to(torch.float32).view(3, 1, 1)
    scale, shift = scale.to(x.device, non_blocking=True), shift.to(x.device, non_blocking=True)
    return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).sub_(shift)


def worker_tensor(view: Image.Image, mean: Sequence[float], std: Sequence[float], uint8: bool):
    """What a DataLoader worker sends for a rendered view: its uint8 values (`uint8_views`: the consumer
    normalises them on its device) or the normalised float view."""
    return to_uint8(view) if uint8 else to_tensor(view, mean, std)


def model_input(x, mean: Sequence[float], std: Sequence[float]):
    """A batch of views as the model input: uint8 views (`uint8_views`) normalised on their device, views the
    workers already normalised as they are."""
    import torch

    return normalize(x, mean, std) if x.dtype == torch.uint8 else x
