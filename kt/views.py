"""Views: augmentation that can be replayed at any resolution, months later.

A view is a pure function of (spec, seed, sample key, view index). `sample_params` turns those four into a
fixed-length float32 vector (`PARAM_DIM` slots, named by `param_names()`); `render` turns a source image and
that vector into pixels at any output size. The teacher renders a view at, say, 224 px while building the
cache; the student later re-renders the same vector at 256 px and sees the same region, flip, colours and
RandAugment ops, because every geometric quantity is stored size-free: the crop box in normalised [0, 1]
coordinates of the source, angles in degrees, shears as factors and translations as fractions of the
output size.

Randomness comes from a counter-based generator (numpy's Philox4x64-10) keyed by a blake2b hash of
(spec fingerprint, seed, key, view index). No global RNG state is read or changed, and nothing depends on
the worker, rank or process that asks, so any DataLoader layout gives the same views. Only the bit
generator's raw 64-bit outputs are used (converted to doubles here), so a change in numpy's `Generator`
methods cannot move them.

The parameters are still **stored** by the cache next to the targets and replayed from storage. At read
time the reader re-samples them and calls `check_params`: should a numpy upgrade ever change Philox (or
this module change its sampling), that fails loudly with `ViewReplayError` instead of silently pairing
cached targets with different views.

Crop boxes are sampled assuming a square source image (the transfer sets here are square: Fashion-MNIST,
square-resized photographs). A non-square source gets the same normalised box, so its crop is stretched
by the source's aspect ratio; resize such sources to square before building the cache if that matters.

Rendering (parameters -> pixels) lives in `kt.render` (PIL, CPU) and `kt.render_tensor` (batched, GPU); both
names stay importable from here. Their speed-ups changed pixels by less than 1/255 on average and no
parameter, so the view format version is still 1 (the reasoning is in `kt.render`'s docstring; the first
renders are kept as `kt.render_v1`, the reference the tests compare against).

Parameter layout (see `param_names()`):
    0-3   crop box x0, y0, x1, y1 (normalised source coordinates)
    4     horizontal flip (0 or 1)
    5-7   brightness, contrast, saturation factors (1 = unchanged)
    8     jitter order: index into `JITTER_ORDERS`
    9-16  MAX_OPS RandAugment slots of (op id into `RANDAUG_OPS`, op argument); unused slots have id -1
  and, only for a spec that mixes (`mix` other than "none"), `MIX_DIM` more slots (`view_dim(spec)` in all):
    17    mix mode: 0 none, 1 MixUp, 2 CutMix (`MIX_MODES`)
    18    lam: the share of the view that is the sample's own (MixUp: its weight; CutMix: 1 - the box's area)
    19    partner draw u in [0, 1): the partner is `partner_row(u, row, n)` of the sample's own input shard
    20-23 CutMix box x0, y0, x1, y1 in normalised output coordinates (the partner's pixels there); zeros else

Mixed views (MixUp, CutMix). Function matching (Beyer et al., "Knowledge distillation: a good teacher is patient
and consistent", CVPR 2022) trains the student on the teacher's outputs for mixed images, which cover the space
between images; a cache answers a precomputed teacher's tendency to overfit only with many distinct views. So a
mix is a view kind like any other: the partner sample and the mixing parameters are part of the view's
parameters, drawn from (spec, seed, key, view) like the rest, the teacher's outputs on the mixed image are
cached, and the student replays the same mix. The partner comes from the sample's own input shard (a row of
it, `partner_row`), so a shard's targets stay self-contained, and it shows its own view of the same index
(its stored base parameters): both images are rendered at the output size, then mixed (`kt.render.render_view`),
so the mix is the same at the teacher's and the student's sizes. apple/ml-dr stores the partner's id beside its
augmentation parameters the same way; timm's Mixup draws lam from Beta(alpha, alpha) per batch, here per view.
Specs that do not mix keep the 17-slot vector, their fields and so their fingerprint: caches built before
mixed views existed replay unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kt.errors import UserError

VIEW_FORMAT_VERSION = 1
MAX_OPS = 4  # RandAugment slots in the vector; N above this would need a new format version

# Op names in id order. Ids are stored in caches: append only, never reorder.
RANDAUG_OPS: tuple[str, ...] = (
    "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
# Orders in which brightness (0), contrast (1) and saturation (2) are applied, as torchvision's ColorJitter.
JITTER_ORDERS: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

_N_GEOM = 5
_N_PHOTO = 4
PARAM_DIM = _N_GEOM + _N_PHOTO + 2 * MAX_OPS  # the base view: what `kt.render.render` draws
_OPS_START = _N_GEOM + _N_PHOTO
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop, before falling back to a centre crop
_N_UNIFORMS = 4 * _CROP_TRIES + 1 + 3 + 1 + 2 * MAX_OPS  # fixed draw count: one part never shifts another
_N_MIX_UNIFORMS = 6  # mix or not, which mix, lam, partner, CutMix box centre x and y (drawn after the rest)
_REPLAY_ATOL = 1e-5  # far below a pixel at any size, far above libm differences between machines

_KINDS = ("train", "eval")
MIXES = ("none", "mixup", "cutmix", "mixup+cutmix")
MIX_MODES = ("none", "mixup", "cutmix")  # slot 17's values, in order
MIX_DIM = 7
_MIX = PARAM_DIM  # first mix slot
# fields added after format 1 was stored: left out of `to_dict` (and so of the fingerprint) at their defaults, so
# that every spec that does not use them keeps the fingerprint, and the views, it always had
_LATER_FIELDS = {"mix": "none", "mix_prob": 1.0, "mixup_alpha": 1.0, "cutmix_alpha": 1.0}


@dataclass(frozen=True)
class ViewSpec:
    """What a view may do; the parameters of one view are drawn from it by `sample_params`."""

    # "train": random-resized-crop + hflip + colour jitter + RandAugment; "eval": resize + centre crop.
    kind: str = "train"  # training is what most views are for
    scale: tuple[float, float] = (0.08, 1.0)  # crop area fraction range of torchvision/timm ImageNet training
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect range of torchvision/timm ImageNet training
    hflip: float = 0.5  # natural images are mirror-symmetric in distribution
    color_jitter: float = 0.4  # brightness/contrast/saturation factor range 1±j, timm's default strength
    randaug_ops: int = 2  # RandAugment N (0 disables), the paper's and timm's usual N
    randaug_magnitude: float = 9.0  # RandAugment M out of 10, timm's "rand-m9" recipe
    crop_pct: float = 0.875  # eval view centre crop fraction, the classic 224/256
    version: int = VIEW_FORMAT_VERSION  # bumped when the meaning of a parameter slot changes
    # mixed views (see the module docstring): none | mixup | cutmix | mixup+cutmix (each mixed view picks one,
    # evenly, as timm's Mixup with switch_prob 0.5); "none" keeps the views every cache before them had
    mix: str = "none"
    mix_prob: float = 1.0  # share of views that are mixed; the rest are plain views of the sample
    mixup_alpha: float = 1.0  # MixUp lam ~ Beta(a, a); 1 is uniform, the function-matching paper's choice
    cutmix_alpha: float = 1.0  # CutMix lam ~ Beta(a, a) (the box covers 1 - lam), timm's default 1

    def __post_init__(self) -> None:
        # Coerce so that a spec read from YAML ([0.08, 1]) has the same fingerprint as the default.
        def number(name: str, v):  # a JSON/YAML string or null is one line, not float()'s traceback
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"view spec: {name} must be a number, got {v!r}")
            return float(v)

        for name in ("scale", "ratio"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise UserError(f"view spec: {name} must be a pair [low, high], got {v!r}")
            object.__setattr__(self, name, (number(name, v[0]), number(name, v[1])))
        for name in ("hflip", "color_jitter", "randaug_magnitude", "crop_pct", "mix_prob", "mixup_alpha",
                     "cutmix_alpha"):
            object.__setattr__(self, name, number(name, getattr(self, name)))
        for name in ("randaug_ops", "version"):
            v = getattr(self, name)
            if number(name, v) != int(v):
                raise UserError(f"view spec: {name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        self._validate()

    def _validate(self) -> None:
        if self.version != VIEW_FORMAT_VERSION:
            raise UserError(
                f"view spec version {self.version} is not supported (this kt reads version {VIEW_FORMAT_VERSION})"
            )
        if self.kind not in _KINDS:
            raise UserError(f"view spec: kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"view spec: scale must satisfy 0 < low <= high <= 1, got {list(self.scale)}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise UserError(f"view spec: ratio must satisfy 0 < low <= high, got {list(self.ratio)}")
        if not 0 <= self.hflip <= 1:
            raise UserError(f"view spec: hflip is a probability in [0, 1], got {self.hflip}")
        if not 0 <= self.color_jitter <= 1:
            raise UserError(f"view spec: color_jitter must be in [0, 1], got {self.color_jitter}")
        if not 0 <= self.randaug_ops <= MAX_OPS:
            raise UserError(f"view spec: randaug_ops must be in [0, {MAX_OPS}], got {self.randaug_ops}")
        if not 0 <= self.randaug_magnitude <= 10:
            raise UserError(f"view spec: randaug_magnitude must be in [0, 10], got {self.randaug_magnitude}")
        if not 0 < self.crop_pct <= 1:
            raise UserError(f"view spec: crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.mix not in MIXES:
            raise UserError(f"view spec: mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        if self.mix != "none" and self.kind != "train":
            raise UserError(f"view spec: mix {self.mix!r} needs kind train (an eval view is one fixed crop)")
        if not 0 <= self.mix_prob <= 1:
            raise UserError(f"view spec: mix_prob is a probability in [0, 1], got {self.mix_prob}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) > 0:
                raise UserError(f"view spec: {name} must be > 0, got {getattr(self, name)}")

    @property
    def mixes(self) -> bool:
        """Whether views of this spec may mix two samples (their vectors then have `MIX_DIM` more slots)."""
        return self.mix != "none"

    def to_dict(self) -> dict:
        """Plain JSON types (pairs as lists), as stored in cache attributes."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewSpec":
        """Inverse of `to_dict`; missing fields take their defaults, unknown fields are an error."""
        if not isinstance(d, dict):
            raise UserError(f"view spec must be a mapping of field to value, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"view spec: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**d)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal specs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 hex of `to_json`; keys the view generator and identifies the spec in caches."""
        # computed once per spec: every sampled view needs it, and asdict + JSON + sha256 cost more than the
        # rest of sampling (the spec is frozen, so the cached value cannot go stale)
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            cached = hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()
            object.__setattr__(self, "_fingerprint", cached)
        return cached


VIEW_PRESETS: dict[str, ViewSpec] = {
    "train": ViewSpec(),
    # For small or low-resolution transfer sets where strong crops and RandAugment destroy the content.
    "light": ViewSpec(scale=(0.35, 1.0), color_jitter=0.2, randaug_ops=0),
    "eval": ViewSpec(kind="eval"),
}


def load_view_spec(arg: str | dict) -> ViewSpec:
    """A spec from a preset name, a JSON/YAML file path, an inline JSON object string, or a mapping."""
    if isinstance(arg, dict):
        return ViewSpec.from_dict(arg)
    if not isinstance(arg, str):
        raise UserError(f"view spec must be a preset name ({', '.join(VIEW_PRESETS)}), a file or a JSON "
                        f"object, got {arg!r}")
    if arg in VIEW_PRESETS:
        return VIEW_PRESETS[arg]
    text = arg.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"view spec: inline JSON does not parse ({e})") from None
        return ViewSpec.from_dict(d)
    if os.path.isfile(arg):
        with open(arg, encoding="utf-8") as f:
            content = f.read()
        if arg.endswith(".json"):
            try:
                d = json.loads(content)
            except json.JSONDecodeError as e:
                raise UserError(f"view spec file {arg}: not valid JSON ({e})") from None
        else:
            import yaml  # YAML is a superset of JSON, so any other extension goes here

            try:
                d = yaml.safe_load(content)
            except yaml.YAMLError as e:
                raise UserError(f"view spec file {arg}: not valid YAML ({e})") from None
        return ViewSpec.from_dict(d)
    raise UserError(
        f"view spec {arg!r} is not a preset ({', '.join(VIEW_PRESETS)}), an existing JSON/YAML file "
        "or an inline JSON object"
    )


def param_names(spec: ViewSpec | None = None) -> list[str]:
    """Human-readable name of each slot of the parameter vector (of `spec`'s views: mix slots where it mixes)."""
    names = ["crop_x0", "crop_y0", "crop_x1", "crop_y1", "flip", "brightness", "contrast", "saturation", "jitter_order"]
    for i in range(MAX_OPS):
        names += [f"op{i}_id", f"op{i}_arg"]
    if spec is not None and spec.mixes:
        names += ["mix_mode", "mix_lam", "mix_partner_u", "mix_box_x0", "mix_box_y0", "mix_box_x1", "mix_box_y1"]
    assert len(names) == (PARAM_DIM if spec is None else view_dim(spec))
    return names


# --- sampling ------------------------------------------------------------------------------------------


def view_dim(spec: ViewSpec) -> int:
    """Length of the parameter vector of `spec`'s views: `PARAM_DIM`, plus `MIX_DIM` where the spec mixes."""
    return PARAM_DIM + (MIX_DIM if spec.mixes else 0)


def base_params(params: np.ndarray) -> np.ndarray:
    """The base view of one vector or of an array of them (last axis): what `kt.render.render` draws."""
    return np.asarray(params)[..., :PARAM_DIM]


def mix_mode(params: np.ndarray) -> str:
    """"none", "mixup" or "cutmix": what the view does with its partner (a base vector never mixes)."""
    p = np.asarray(params)
    return "none" if p.shape[-1] <= PARAM_DIM else MIX_MODES[int(round(float(p[_MIX])))]


def partner_row(params: np.ndarray, row: int, n: int) -> int | None:
    """The row of the mixed view's partner in its input shard of `n` samples (in the cache's row order), or None
    when the view does not mix. Never the sample itself where the shard has another."""
    if mix_mode(params) == "none":
        return None
    if n <= 1:
        return row
    u = float(np.asarray(params)[_MIX + 2])
    return (row + 1 + min(int(u * (n - 1)), n - 2)) % n


def _beta_quantile(alpha: float, u: float) -> float:
    """The u-quantile of Beta(alpha, alpha): lam from one uniform, so the draw count stays fixed (numpy's beta
    sampler uses a variable number of draws and may change between releases)."""
    if alpha == 1.0:
        return u
    from scipy.special import betaincinv  # only specs with another alpha need it

    return float(betaincinv(alpha, alpha, u))


def _mix_slots(spec: ViewSpec, u: Sequence[float]) -> np.ndarray:
    """The `MIX_DIM` mix slots from `_N_MIX_UNIFORMS` uniforms (see the module docstring)."""
    out = np.zeros(MIX_DIM, dtype=np.float64)
    out[1] = 1.0
    if u[0] >= spec.mix_prob:
        return out
    mode = {"mixup": 1, "cutmix": 2}.get(spec.mix) or (1 if u[1] < 0.5 else 2)
    out[0], out[2] = mode, u[3]
    if mode == 1:
        out[1] = _beta_quantile(spec.mixup_alpha, u[2])
        return out
    # timm's rand_bbox: a box of side sqrt(1 - lam) centred anywhere, clipped to the image; lam is then
    # corrected to the share left to the sample (timm's correct_lam)
    cut = math.sqrt(1.0 - _beta_quantile(spec.cutmix_alpha, u[2]))
    x0, x1 = max(0.0, u[4] - cut / 2), min(1.0, u[4] + cut / 2)
    y0, y1 = max(0.0, u[5] - cut / 2), min(1.0, u[5] + cut / 2)
    out[1] = 1.0 - (x1 - x0) * (y1 - y0)
    out[3:7] = (x0, y0, x1, y1)
    return out


def _uniforms(spec: ViewSpec, seed: int, key: str, view: int) -> list[float]:
    """`_N_UNIFORMS` doubles in [0, 1) (and `_N_MIX_UNIFORMS` more after them for a spec that mixes), a pure
    function of the four arguments."""
    if isinstance(key, bytes):
        key = key.decode("utf-8")
    if not isinstance(key, str):
        raise TypeError(f"sample key must be str, got {type(key).__name__}")
    msg = json.dumps([spec.fingerprint(), int(seed), key, int(view)], separators=(",", ":")).encode("utf-8")
    philox_key = int.from_bytes(hashlib.blake2b(msg, digest_size=16).digest(), "little")
    # a counter-based stream: the mix draws come after the base ones and move none of them
    raw = np.random.Philox(key=philox_key).random_raw(_N_UNIFORMS + (_N_MIX_UNIFORMS if spec.mixes else 0))
    # The standard 53-bit conversion, done here so it cannot change with numpy's Generator. Vectorised: a
    # 53-bit integer converts to float64 exactly and the power-of-two scale is exact, so the values are
    # bit for bit those of the former per-element Python loop.
    return ((raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)).tolist()


def _crop_box(spec: ViewSpec, u: Sequence[float]) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop in normalised coordinates of a square source."""
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for t in range(_CROP_TRIES):
        ua, ur, ux, uy = u[4 * t : 4 * t + 4]
        area = spec.scale[0] + (spec.scale[1] - spec.scale[0]) * ua
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if 0 < w <= 1 and 0 < h <= 1:
            x0, y0 = (1 - w) * ux, (1 - h) * uy
            return x0, y0, min(x0 + w, 1.0), min(y0 + h, 1.0)
    # Fallback: the largest centred crop whose aspect lies in `ratio`.
    if spec.ratio[0] > 1:
        w, h = 1.0, 1.0 / spec.ratio[0]
    elif spec.ratio[1] < 1:
        w, h = spec.ratio[1], 1.0
    else:
        w = h = 1.0
    return (1 - w) / 2, (1 - h) / 2, (1 + w) / 2, (1 + h) / 2


def _op_arg(name: str, m: float, sign: float) -> float:
    """The op's argument at relative magnitude m in [0, 1]; signed ops take the random sign."""
    if name in ("Identity", "AutoContrast", "Equalize"):
        return 0.0
    if name == "Rotate":
        return sign * 30.0 * m  # degrees
    if name in ("ShearX", "ShearY"):
        return sign * 0.3 * m  # shear factor
    if name in ("TranslateX", "TranslateY"):
        return sign * 0.45 * m  # fraction of the output width/height
    if name == "Solarize":
        return 256.0 - 256.0 * m  # threshold: invert pixels at or above it
    if name == "Posterize":
        return float(8 - round(4 * m))  # bits kept, 8 down to 4
    return 1.0 + sign * 0.9 * m  # Color, Contrast, Brightness, Sharpness: enhance factor


def sample_params(spec: ViewSpec, seed: int, key: str, view: int) -> np.ndarray:
    """The parameter vector of one view, float32 of shape (`view_dim(spec)`,); see the module docstring."""
    p = np.zeros(view_dim(spec), dtype=np.float64)
    p[5:8] = 1.0
    p[_OPS_START::2] = -1.0
    if spec.kind == "eval":
        c = spec.crop_pct
        p[0:4] = ((1 - c) / 2, (1 - c) / 2, (1 + c) / 2, (1 + c) / 2)
        return p.astype(np.float32)
    u = _uniforms(spec, seed, key, view)
    p[0:4] = _crop_box(spec, u)
    i = 4 * _CROP_TRIES
    p[4] = 1.0 if u[i] < spec.hflip else 0.0
    j = spec.color_jitter
    for s in range(3):
        p[5 + s] = max(0.0, 1 - j) + (1 + j - max(0.0, 1 - j)) * u[i + 1 + s]
    p[8] = min(int(u[i + 4] * len(JITTER_ORDERS)), len(JITTER_ORDERS) - 1)
    m = spec.randaug_magnitude / 10.0
    i += 5
    for k in range(spec.randaug_ops):
        op = min(int(u[i + 2 * k] * len(RANDAUG_OPS)), len(RANDAUG_OPS) - 1)
        sign = -1.0 if u[i + 2 * k + 1] < 0.5 else 1.0
        p[_OPS_START + 2 * k] = op
        p[_OPS_START + 2 * k + 1] = _op_arg(RANDAUG_OPS[op], m, sign)
    if spec.mixes:
        p[_MIX:] = _mix_slots(spec, u[_N_UNIFORMS:])
    return p.astype(np.float32)


def sample_params_batch(spec: ViewSpec, seed: int, keys: Sequence[str], views: int | Sequence[int]) -> np.ndarray:
    """`sample_params` for each (key, view) pair, shape (N, PARAM_DIM); an int `views` applies to every key."""
    if isinstance(views, (int, np.integer)):
        views = [int(views)] * len(keys)
    if len(views) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(views)} view indices")
    out = np.empty((len(keys), view_dim(spec)), dtype=np.float32)
    for n, (k, v) in enumerate(zip(keys, views)):
        out[n] = sample_params(spec, seed, k, int(v))
    return out


@dataclass(frozen=True)
class ViewSet:
    """The views of a transfer set: `views` per image, drawn from `spec` with `seed`.

    One value wherever views are drawn (the cache build) or replayed (the student stream, verify), instead
    of three loose arguments that must always travel together; a cache records it as its `view` attribute.
    """

    spec: ViewSpec
    seed: int
    views: int

    def params(self, key: str, view: int) -> np.ndarray:
        return sample_params(self.spec, self.seed, key, view)

    def check(self, key: str, view: int, stored: np.ndarray) -> None:
        check_params(self.spec, self.seed, key, view, stored)


class ViewReplayError(UserError):
    """Stored view parameters differ from re-sampling them: targets and views would be out of sync."""


def check_params(spec: ViewSpec, seed: int, key: str, view: int, stored: np.ndarray) -> None:
    """Raise `ViewReplayError` unless re-sampling (spec, seed, key, view) gives the stored vector."""
    stored = np.asarray(stored, dtype=np.float32)
    if stored.shape != (view_dim(spec),):
        raise ViewReplayError(
            f"key {key!r} view {view}: stored view parameters have shape {stored.shape}, expected "
            f"({view_dim(spec)},) (view format version {VIEW_FORMAT_VERSION}, mix {spec.mix!r})"
        )
    fresh = sample_params(spec, seed, key, view)
    diff = np.abs(fresh.astype(np.float64) - stored.astype(np.float64))
    if not np.all(diff <= _REPLAY_ATOL):
        slot = int(np.argmax(np.where(np.isnan(diff), np.inf, diff)))
        raise ViewReplayError(
            f"key {key!r} view {view}: stored view parameters differ from re-sampling with seed {seed} "
            f"(first at {param_names(spec)[slot]}: stored {stored[slot]:.6g}, re-sampled {fresh[slot]:.6g}); "
            f"the cache was built with another view spec, seed or numpy RNG (numpy here: {np.__version__})"
        )


def check_params_batch(
    spec: ViewSpec, seed: int, keys: Sequence[str], views: Sequence[int], stored: np.ndarray
) -> None:
    """`check_params` for each row of `stored`, shape (N, PARAM_DIM)."""
    stored = np.asarray(stored)
    if stored.ndim != 2 or len(stored) != len(keys) or len(views) != len(keys):
        raise ViewReplayError(
            f"stored view parameters have shape {stored.shape} for {len(keys)} keys and {len(views)} views"
        )
    for k, v, row in zip(keys, views, stored):
        check_params(spec, seed, k, int(v), row)


# --- rendering ---------------------------------------------------------------------------------------
# Rendering lives in kt.render (PIL) and kt.render_tensor (batched tensors, CUDA); the names stay importable
# from here, where every caller has always found them. Resolved lazily (PEP 562) because kt.render imports
# this module's constants.
_RENDER_NAMES = frozenset({"render", "render_mask", "to_tensor", "decode_for_views"})


def __getattr__(name: str):
    if name in _RENDER_NAMES:
        from kt import render as _render

        return getattr(_render, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
