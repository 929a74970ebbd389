"""Target codecs: how teacher outputs are shrunk before they go into the cache, and how well they survive.

Each cached target has one `Codec` instance. `encode` turns raw teacher outputs into named parts (small
arrays that the store writes with a lossless compressor on top); `decode` turns the parts back into a
float32 array of the raw shape; `fidelity` measures what was lost. Codecs are pure numpy.

Targets and their item shapes (the shape of one view's output):

    logits      (K,)        task predictions of a classification teacher
    embedding   (D,)        global image feature (CLS token / pooled)
    patches     (h, w, C)   the spatial feature grid, channels last
    seg_logits  (K, H, W)   per-pixel class logits, classes first

Arrays passed to `encode` have any number of leading axes before the item shape ((N,) for a batch,
(N, V) for a stored shard); the parts and the decoded array keep them.

Codecs (spec strings as written on the command line, `--codec TARGET=SPEC`):

    fp16              any target     values in float16 (clipped to the float16 range)
    topk:k=K          logits         log-probabilities of the K most likely classes (float16), their
                                     indices (smallest unsigned int that holds the class count) and the
                                     log of the remaining probability mass (float16)
    pixel-topk:k=K    seg_logits     the same per pixel
    int8              features       symmetric int8 per vector (last axis) with a float32 scale
    pca:d=D[,int8|fp16]  features    projection on a PCA basis of D components (fitted on a sample, mean
                                     and basis stored in the cache), coefficients as int8 + per-vector
                                     float32 scale (default) or float16
    auto[:cos=C]      features       chosen at fit time: the smallest `pca:d=D,int8` (D = 8, 16, 32, ...
                                     below the channel count) whose mean cosine on held-out vectors of the
                                     fit sample reaches C (default 0.98), else `int8`; the cache stores the
                                     chosen codec, and its measured fidelity as `selection`

What `decode` returns: features come back as float32 features. Logit codecs return *normalised
log-probabilities* log q, where q is the decoded distribution: the kept classes get their own
probabilities and the tail mass is spread uniformly over the other classes, so q sums to 1 and
softmax(log q) == q. For the fp16 codec the logits come back as logits. Either way
softmax(decoded / T) is the tempered teacher distribution (log-probabilities differ from logits by a
per-row constant), which is all the KL loss needs.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from kt.errors import UserError

#: number of trailing axes that make one item, per target kind
ITEM_NDIM = {"logits": 1, "embedding": 1, "patches": 3, "seg_logits": 3}

DEFAULT_CODECS = {
    "logits": "topk:k=10",  # 42 bytes per view for 1000 classes (goal <= 50), tail mass kept
    "embedding": "fp16",  # one vector per view: full precision costs little
    # the smallest codec that keeps the patch targets trustworthy on this teacher: a fixed pca:d=64,int8 kept
    # a mean cosine of 0.74 (min 0.16) on the Lite2 grid (docs/benchmarks.md), i.e. distorted targets
    "patches": "auto:cos=0.98",
    # measured (docs/benchmarks.md, "Segmentation codecs"): 17 bytes a grid cell whatever the class count (fp16:
    # 2 per class, 300 for ADE20K's 150), KL 0.002 nats on a finetuned Lite2 (k=3: 0.005, k=1: 0.014)
    "seg_logits": "pixel-topk:k=5",
}

PartSpecs = dict[str, tuple[tuple[int, ...], np.dtype]]

_F16_MAX = float(np.finfo(np.float16).max)
_RANK_NUDGE = 1e-5  # log-space step that keeps decoded top-k classes in their stored order
_LOG_TAIL_FLOOR = -100.0  # log of a tail mass that is zero in float64; exp(-100) is far below any loss


class Codec:
    """Encoder/decoder for one target of a cache. Subclasses set `name`, `usage` and `targets`."""

    name: str = ""
    usage: str = ""  # how the spec is written, for error messages
    targets: tuple[str, ...] = ()

    def __init__(self, target: str):
        self.target = target
        self.item_shape: tuple[int, ...] | None = None  # bound on first fit/encode, stored in state
        self.selection: dict | None = None  # how `auto` chose this codec (stored in state), else None

    # -- spec and construction -------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec string: `parse_codec(codec.spec, target)` builds an equivalent codec."""
        return self.name

    @classmethod
    def from_args(cls, target: str, kv: dict[str, str], flags: list[str]) -> "Codec":
        _reject_args(cls, target, kv, flags)
        return cls(target)

    # -- the codec -------------------------------------------------------------------------------
    def fit(self, sample: np.ndarray) -> None:
        """Learn what the codec needs from a sample of raw targets; only PCA needs anything."""
        self._split(sample)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def part_specs(self, item_shape) -> PartSpecs:
        """Shape per item and dtype of each part that `encode` returns for items of `item_shape`."""
        raise NotImplementedError

    def bytes_per_item(self, item_shape) -> int:
        """Bytes of the encoded parts of one item, before lossless compression."""
        return sum(
            math.prod(shape) * np.dtype(dtype).itemsize
            for shape, dtype in self.part_specs(tuple(item_shape)).values()
        )

    # -- persistence -----------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """JSON attributes and arrays that rebuild this codec with `from_state`."""
        shape = None if self.item_shape is None else list(self.item_shape)
        attrs = {"spec": self.spec, "target": self.target, "item_shape": shape}
        if self.selection is not None:
            attrs["selection"] = self.selection
        return attrs, {}

    @classmethod
    def from_state(cls, attrs: dict, arrays: dict[str, np.ndarray]) -> "Codec":
        codec = parse_codec(attrs["spec"], attrs["target"])
        if not isinstance(codec, cls):
            raise ValueError(f"state of a {type(codec).__name__}, not a {cls.__name__}")
        if attrs.get("item_shape") is not None:
            codec.item_shape = tuple(attrs["item_shape"])
        codec.selection = attrs.get("selection")
        codec._load_arrays(arrays)
        return codec

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    # -- helpers ---------------------------------------------------------------------------------
    def _split(self, x: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(leading axes, item shape) of `x`; binds the codec to the item shape on first use."""
        nd = ITEM_NDIM[self.target]
        if x.ndim < nd:
            raise ValueError(f"{self.target} needs at least {nd} axes, got shape {x.shape}")
        lead, item = tuple(x.shape[: x.ndim - nd]), tuple(x.shape[x.ndim - nd :])
        if self.item_shape is None:
            self.item_shape = item
        elif item != self.item_shape:
            raise ValueError(f"{self.target} item shape {item} differs from {self.item_shape}")
        return lead, item

    def _bound_item_shape(self) -> tuple[int, ...]:
        if self.item_shape is None:
            raise RuntimeError(f"{self.spec} codec for {self.target} has no item shape yet")
        return self.item_shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target}={self.spec})"


# ----------------------------------------------------------------------------------------------
class Fp16Codec(Codec):
    name = usage = "fp16"
    targets = ("logits", "embedding", "patches", "seg_logits")

    def encode(self, x):
        self._split(x)
        return {"values": np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16)}

    def decode(self, parts):
        return parts["values"].astype(np.float32)

    def part_specs(self, item_shape):
        return {"values": (tuple(item_shape), np.dtype(np.float16))}


class Int8Codec(Codec):
    """Symmetric int8 per vector (last axis): q = round(x / s), s = max|x| / 127 stored as float32."""

    name = usage = "int8"
    targets = ("embedding", "patches")

    def encode(self, x):
        self._split(x)
        q, scale = _quantize_int8(np.asarray(x, dtype=np.float32))
        return {"values": q, "scale": scale}

    def decode(self, parts):
        return parts["values"].astype(np.float32) * parts["scale"].astype(np.float32)[..., None]

    def part_specs(self, item_shape):
        item_shape = tuple(item_shape)
        return {
            "values": (item_shape, np.dtype(np.int8)),
            "scale": (item_shape[:-1], np.dtype(np.float32)),
        }


class PcaCodec(Codec):
    """Projection on the top `d` principal components of the last axis (tokens for patches)."""

    name = "pca"
    usage = "pca:d=D[,int8|fp16]"
    targets = ("embedding", "patches")

    def __init__(self, target: str, d: int, quant: str = "int8"):
        super().__init__(target)
        self.d, self.quant = d, quant
        self.mean: np.ndarray | None = None  # (C,) float32
        self.basis: np.ndarray | None = None  # (C, d) float32, orthonormal columns
        self.explained: float | None = None  # fraction of the sample's variance the basis keeps

    @property
    def spec(self) -> str:
        return f"pca:d={self.d},{self.quant}"

    @classmethod
    def from_args(cls, target, kv, flags):
        d = _int_arg(cls, target, kv, "d")
        quant = [f for f in flags if f in ("int8", "fp16")]
        extra = [f for f in flags if f not in ("int8", "fp16")] + [k for k in kv if k != "d"]
        if extra or len(quant) > 1:
            raise UserError(f"invalid codec arguments {extra or quant} for {target}; write {cls.usage}")
        return cls(target, d, quant[0] if quant else "int8")

    def fit(self, sample):
        _, item = self._split(sample)
        channels = item[-1]
        if self.d > channels:
            raise UserError(f"codec {self.spec}: d={self.d} exceeds the {channels} channels of {self.target}")
        x = np.asarray(sample, dtype=np.float64).reshape(-1, channels)
        if x.shape[0] < self.d:
            raise UserError(f"codec {self.spec}: the PCA sample has {x.shape[0]} vectors, needs >= {self.d}")
        self.set_components(*principal_components(x))

    def set_components(self, mean: np.ndarray, eigval: np.ndarray, basis: np.ndarray) -> None:
        """Keep the first `d` of all components (`principal_components`): what fitting with `d` gives, so
        `auto` decomposes once and tries every `d`."""
        total = float(eigval.sum())
        self.explained = float(eigval[: self.d].sum() / total) if total > 0 else 1.0
        self.mean, self.basis = mean.astype(np.float32), np.ascontiguousarray(basis[:, : self.d], dtype=np.float32)

    def encode(self, x):
        self._split(x)
        self._check_fitted()
        coeffs = _matmul_last(np.asarray(x, dtype=np.float32) - self.mean, self.basis)
        if self.quant == "fp16":
            return {"coeffs": np.clip(coeffs, -_F16_MAX, _F16_MAX).astype(np.float16)}
        q, scale = _quantize_int8(coeffs)
        return {"coeffs": q, "scale": scale}

    def decode(self, parts):
        self._check_fitted()
        coeffs = parts["coeffs"].astype(np.float32)
        if self.quant == "int8":
            coeffs *= parts["scale"].astype(np.float32)[..., None]
        out = _matmul_last(coeffs, self.basis.T)
        out += self.mean
        return out

    def part_specs(self, item_shape):
        item_shape = tuple(item_shape)
        coeff_shape = item_shape[:-1] + (self.d,)
        if self.quant == "fp16":
            return {"coeffs": (coeff_shape, np.dtype(np.float16))}
        return {
            "coeffs": (coeff_shape, np.dtype(np.int8)),
            "scale": (item_shape[:-1], np.dtype(np.float32)),
        }

    def state(self):
        attrs, _ = super().state()
        self._check_fitted()
        attrs["explained_variance"] = self.explained
        return attrs, {"mean": self.mean, "basis": self.basis}

    def _load_arrays(self, arrays):
        self.mean = np.asarray(arrays["mean"], dtype=np.float32)
        self.basis = np.asarray(arrays["basis"], dtype=np.float32)
        if self.basis.shape[1] != self.d or self.mean.shape != (self.basis.shape[0],):
            raise ValueError(f"PCA state of shapes {self.mean.shape}, {self.basis.shape} does not fit {self.spec}")

    def _check_fitted(self):
        if self.basis is None:
            raise RuntimeError(f"codec {self.spec} for {self.target} is used before fit()")


class TopKCodec(Codec):
    """The k most likely classes exactly (as float16 log-probabilities) plus the tail mass."""

    name = "topk"
    usage = "topk:k=K"
    targets = ("logits",)
    class_axis = -1  # axis of the classes within the item

    def __init__(self, target: str, k: int):
        super().__init__(target)
        self.k = k

    @property
    def spec(self) -> str:
        return f"{self.name}:k={self.k}"

    @classmethod
    def from_args(cls, target, kv, flags):
        k = _int_arg(cls, target, kv, "k")
        if flags or set(kv) != {"k"}:
            extra = flags + sorted(set(kv) - {"k"})
            raise UserError(f"invalid codec arguments {extra} for {target}; write {cls.usage}")
        return cls(target, k)

    def encode(self, x):
        _, item = self._split(x)
        num_classes = self._num_classes(item)
        logits = np.moveaxis(np.asarray(x, dtype=np.float64), self.class_axis, -1)
        logp = logits - _logsumexp(logits)
        idx = np.argpartition(-logp, self.k - 1, axis=-1)[..., : self.k]
        top = np.take_along_axis(logp, idx, -1)
        order = np.argsort(-top, axis=-1, kind="stable")  # most likely first: deterministic parts
        idx, top = np.take_along_axis(idx, order, -1), np.take_along_axis(top, order, -1)
        kept = np.zeros(logp.shape, dtype=bool)
        np.put_along_axis(kept, idx, True, -1)
        tail = np.where(kept, 0.0, np.exp(logp)).sum(-1)  # summed directly: 1 - sum(top) cancels
        with np.errstate(divide="ignore"):
            log_tail = np.maximum(np.log(tail), _LOG_TAIL_FLOOR)
        return {
            "values": np.moveaxis(top, -1, self.class_axis).astype(np.float16),
            "indices": np.moveaxis(idx, -1, self.class_axis).astype(_index_dtype(num_classes)),
            "tail": log_tail.astype(np.float16),
        }

    def decode(self, parts):
        num_classes = self._num_classes(self._bound_item_shape())
        top = np.moveaxis(parts["values"].astype(np.float64), self.class_axis, -1)
        # values are stored most likely first; float16 rounding can tie neighbours, so keep the stored
        # order with a nudge far below float16 resolution (the top-1 class survives decoding)
        top = top - _RANK_NUDGE * np.arange(self.k)
        idx = np.moveaxis(parts["indices"].astype(np.int64), self.class_axis, -1)
        rest = num_classes - self.k
        tail = np.exp(parts["tail"].astype(np.float64)) if rest else np.zeros(top.shape[:-1])
        log_z = np.log(np.exp(top).sum(-1) + tail)  # renormalise away float16 rounding
        with np.errstate(divide="ignore"):
            log_rest = np.log(tail / max(rest, 1)) - log_z
        out = np.repeat(log_rest[..., None], num_classes, axis=-1)
        np.put_along_axis(out, idx, top - log_z[..., None], -1)
        return np.moveaxis(out, -1, self.class_axis).astype(np.float32)

    def part_specs(self, item_shape):
        item_shape = tuple(item_shape)
        num_classes = self._num_classes(item_shape)
        kept = list(item_shape)
        kept[self.class_axis] = self.k
        tail_shape = item_shape[:-1] if self.class_axis == -1 else item_shape[1:]
        return {
            "values": (tuple(kept), np.dtype(np.float16)),
            "indices": (tuple(kept), np.dtype(_index_dtype(num_classes))),
            "tail": (tail_shape, np.dtype(np.float16)),
        }

    def _num_classes(self, item_shape) -> int:
        num_classes = item_shape[self.class_axis]
        if self.k > num_classes:
            raise UserError(f"codec {self.spec}: k exceeds the {num_classes} classes of {self.target}")
        return num_classes


class PixelTopKCodec(TopKCodec):
    """`topk` per pixel of (K, H, W) segmentation logits."""

    name = "pixel-topk"
    usage = "pixel-topk:k=K"
    targets = ("seg_logits",)
    class_axis = -3


class AutoCodec(Codec):
    """A feature codec chosen on the data: the smallest PCA (int8 coefficients) whose mean cosine on held-out
    vectors reaches `cos`, else int8. How well PCA keeps a teacher's features depends on the teacher (a fixed
    d=64 kept 0.999 on DINOv2-like grids and 0.74 on EfficientNet-Lite2's), so the build measures instead of
    guessing. After `fit` it encodes, decodes and stores itself as the chosen codec (`chosen`), whose `state`
    records the choice (`selection`: requested spec, fidelity, every candidate tried); before `fit` its size
    is that of the `int8` fallback, an upper bound (what `kt-cache plan` predicts)."""

    name = "auto"
    usage = "auto[:cos=C]"
    targets = ("embedding", "patches")
    held_out = 0.25  # fraction of the fit sample's items (views) kept out of the fit to measure on
    dims = (8, 16, 32, 64, 128, 256, 512, 1024)  # PCA sizes tried, smallest first

    def __init__(self, target: str, cos: float = 0.98):
        super().__init__(target)
        self.cos = cos
        self.chosen: Codec | None = None

    @property
    def spec(self) -> str:
        return f"auto:cos={self.cos:g}"

    @classmethod
    def from_args(cls, target, kv, flags):
        if flags or set(kv) - {"cos"}:
            raise UserError(f"invalid codec arguments {flags + sorted(set(kv) - {'cos'})} for {target}; "
                            f"write {cls.usage}")
        try:
            cos = float(kv.get("cos", 0.98))
        except ValueError:
            cos = float("nan")
        if not 0 < cos <= 1:
            raise UserError(f"codec auto for {target} needs 0 < cos <= 1, got {kv.get('cos')!r}; write {cls.usage}")
        return cls(target, cos)

    def fit(self, sample):
        lead, item = self._split(sample)
        sample = np.asarray(sample, dtype=np.float32).reshape((-1,) + item)  # items (views) first
        n_test = max(1, int(round(len(sample) * self.held_out))) if len(sample) > 1 else 0
        fit_part, test = sample[: len(sample) - n_test], sample[len(sample) - n_test:]
        if not len(test):
            test = fit_part  # one item: nothing to hold out, measured in-sample
        channels = item[-1]
        vectors = fit_part.reshape(-1, channels).astype(np.float64)
        dims = [d for d in self.dims if d < channels and d <= len(vectors)]
        tried = []
        chosen: Codec | None = None
        if dims:
            components = principal_components(vectors)
            for d in dims:
                codec = PcaCodec(self.target, d)
                codec.item_shape = item
                codec.set_components(*components)
                fid = fidelity(self.target, test, codec.decode(codec.encode(test)))
                tried.append({"codec": codec.spec, **_rounded(fid)})
                if fid["cosine_mean"] >= self.cos:
                    chosen = codec
                    break
        if chosen is None:
            chosen = Int8Codec(self.target)
            chosen.item_shape = item
            fid = fidelity(self.target, test, chosen.decode(chosen.encode(test)))
            tried.append({"codec": chosen.spec, **_rounded(fid)})
        chosen.selection = {"requested": self.spec, "fidelity": {k: v for k, v in tried[-1].items() if k != "codec"},
                            "held_out_items": int(len(test)), "fit_items": int(len(fit_part)), "tried": tried}
        self.chosen = chosen

    def _fitted(self) -> Codec:
        if self.chosen is None:
            raise RuntimeError(f"codec {self.spec} for {self.target} is used before fit()")
        return self.chosen

    def encode(self, x):
        return self._fitted().encode(x)

    def decode(self, parts):
        return self._fitted().decode(parts)

    def part_specs(self, item_shape):
        return (self.chosen or Int8Codec(self.target)).part_specs(item_shape)

    def state(self):
        return self._fitted().state()


def principal_components(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, eigenvalues, basis) of (N, C) vectors: every component, the largest first, each column's sign
    fixed (largest entry positive) so that refits give the same basis."""
    mean = x.mean(0)
    xc = x - mean
    eigval, eigvec = np.linalg.eigh(xc.T @ xc / x.shape[0])
    order = np.argsort(eigval)[::-1]
    basis = eigvec[:, order]
    signs = np.sign(basis[np.abs(basis).argmax(0), np.arange(basis.shape[1])])
    basis *= np.where(signs == 0, 1.0, signs)
    return mean, np.clip(eigval[order], 0, None), basis


def _rounded(fid: dict) -> dict:
    return {k: round(v, 6) for k, v in fid.items()}


# ----------------------------------------------------------------------------------------------
#: per target, the codecs it accepts (explicit table: no registry filled by imports)
CODECS: dict[str, dict[str, type[Codec]]] = {
    target: {c.name: c for c in (Fp16Codec, Int8Codec, PcaCodec, AutoCodec, TopKCodec, PixelTopKCodec)
             if target in c.targets}
    for target in ITEM_NDIM
}


def parse_codec(spec: str, target: str) -> Codec:
    """Build the codec that `spec` (e.g. "topk:k=10", "pca:d=64,int8") names for `target`."""
    if target not in CODECS:
        raise UserError(f"unknown target {target!r}; valid targets: {', '.join(CODECS)}")
    valid = CODECS[target]
    listing = ", ".join(c.usage for c in valid.values())
    name, _, args = spec.strip().partition(":")
    if name.strip() not in valid:
        raise UserError(f"unknown codec {spec!r} for target {target}; valid: {listing}")
    kv: dict[str, str] = {}
    flags: list[str] = []
    for arg in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = (s.strip() for s in arg.partition("="))
        if not eq:
            flags.append(key)
        elif key in kv or not value:
            raise UserError(f"invalid codec spec {spec!r} for target {target}; valid: {listing}")
        else:
            kv[key] = value
    return valid[name.strip()].from_args(target, kv, flags)


def fidelity(target: str, raw: np.ndarray, decoded: np.ndarray) -> dict:
    """What a codec lost, measured against the raw teacher output.

    logits / seg_logits (per pixel): kl_mean and kl_max of KL(softmax(raw) || softmax(decoded)) in nats,
    top1_agreement. embedding / patches: cosine_mean and cosine_min over vectors (tokens for patches).
    """
    if target not in ITEM_NDIM:
        raise UserError(f"unknown target {target!r}; valid targets: {', '.join(ITEM_NDIM)}")
    raw, decoded = np.asarray(raw, np.float64), np.asarray(decoded, np.float64)
    if raw.shape != decoded.shape:
        raise ValueError(f"raw {raw.shape} and decoded {decoded.shape} shapes differ")
    if target in ("logits", "seg_logits"):
        axis = -1 if target == "logits" else -3
        logp = np.moveaxis(raw, axis, -1)
        logq = np.moveaxis(decoded, axis, -1)
        logp, logq = logp - _logsumexp(logp), logq - _logsumexp(logq)
        p = np.exp(logp)
        kl = np.where(p > 0, p * (logp - logq), 0.0).sum(-1)
        return {
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "top1_agreement": float((logp.argmax(-1) == logq.argmax(-1)).mean()),
        }
    dot = (raw * decoded).sum(-1)
    norms = np.linalg.norm(raw, axis=-1) * np.linalg.norm(decoded, axis=-1)
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


# ----------------------------------------------------------------------------------------------
def _quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 along the last axis, with a float32 scale per vector.

    float32, not float16: a float16 scale underflows to zero below ~6e-8 (vectors under ~1e-5 decoded to
    zero) and is subnormal, losing precision, from ~6e-5 down; features that small are real (normalised
    embeddings of tiny norm, PCA residual coefficients). It costs 2 bytes more per vector (68 instead of 66
    per patch token at d=64). Caches written with a float16 scale decode unchanged (decode casts either).
    """
    x = np.asarray(x, dtype=np.float32)
    q = np.abs(x)  # one buffer for every step below (the build encodes in the teacher's thread on a CPU)
    scale = (q.max(-1) / np.float32(127.0)).astype(np.float32)
    s = scale[..., None]
    np.divide(x, s, out=q, where=s > 0)
    unscaled = ~(scale > 0)  # all-zero vectors (q is 0 there already) and non-finite ones: 0, as before
    if unscaled.any():
        q[unscaled] = 0
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale


def _matmul_last(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """x @ matrix over the last axis as one 2-D product (a stacked matmul runs many tiny ones)."""
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1]) @ matrix
    return flat.reshape(x.shape[:-1] + (matrix.shape[1],))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _index_dtype(num_classes: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise UserError(f"{num_classes} classes do not fit a 32-bit class index")


def _int_arg(cls: type[Codec], target: str, kv: dict[str, str], key: str) -> int:
    value = kv.get(key)
    if value is None or not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise UserError(f"codec {cls.name} for {target} needs a positive integer {key}; write {cls.usage}")
    return int(value)


def _reject_args(cls: type[Codec], target: str, kv: dict[str, str], flags: list[str]) -> None:
    if kv or flags:
        raise UserError(f"codec {cls.name} for {target} takes no arguments; write {cls.usage}")


def split_codec_flags(values: Sequence[str] | str | None) -> list[str]:
    """`--codec` values (or a YAML `codec` string or list) -> ["TARGET=SPEC", ...]: a comma starts a new item
    only before a target name (`logits=topk:k=5,patches=pca:d=16,int8` is two items). Idempotent."""
    items: list[str] = []
    for value in [values] if isinstance(values, str) else values or []:
        for piece in str(value).split(","):
            name = piece.split("=", 1)[0].strip()
            if "=" in piece and name in ITEM_NDIM or not items:
                items.append(piece.strip())
            else:
                items[-1] += "," + piece.strip()
    return [i for i in items if i]
