"""Encoding the heavy targets on the teacher's GPU, before their copy back to the host.

The writer encodes targets with numpy (`kt.teacher_cache.codecs`, which stay pure numpy: the reader, the
fidelity measures and the CPU build use them). For ViT-L/14 patch tokens that host work is the build's largest:
a `pca:d=64,int8` projection is 256 x 1024 x 64 multiply-adds a view, ~690-1,860 views/s per writer thread
against one H200's 2,060 teacher views/s (docs/benchmarks.md), i.e. ~35 cores for 8 GPUs (docs/capacity.md).
On the GPU it is one batched matmul, and what crosses PCIe shrinks with it: 1 MiB of float32 tokens a view
becomes 16 KiB of int8 coefficients and their scales.

`encoders(codecs, targets)` picks the targets worth it (HEAVY: patches) whose codec has a torch twin here:
`int8`, `pca:d=D,int8|fp16` and `fp16`, each computing the parts `encode` computes, with the same float32
operations in the same order. `int8` and `fp16` give the same bytes as the host; a PCA projection is a float32
matmul whose summation order is the device's, so a coefficient can land one int8 step away where the
host's product rounds the other way (tested: at most one step, scales equal to float32 precision).

Rows with a non-finite output in any target are zeroed on the device before encoding, as the writer does on
the host; each encoded target also reports which rows were finite (`finite`), so that the writer can still
drop those samples and name the targets at fault.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

from kt.teacher_cache.codecs import _F16_MAX, Codec, Fp16Codec, Int8Codec, PcaCodec

# targets whose encoding is worth moving: a projection or quantisation of every patch token. seg_logits'
# pixel top-k stays on the host (no torch twin here yet); logits and embedding are small.
HEAVY = ("patches",)

Encoder = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`codecs._quantize_int8` in torch: symmetric int8 along the last axis, a float32 scale per vector."""
    x = x.float()
    scale = x.abs().amax(-1) / 127.0
    scaled = scale > 0  # all-zero vectors stay 0, as on the host
    q = torch.where(scaled.unsqueeze(-1), x / torch.where(scaled, scale, 1.0).unsqueeze(-1), 0.0)
    return q.round_().clamp_(-127, 127).to(torch.int8), scale


def encoder(codec: Codec, device: torch.device) -> Encoder | None:
    """The torch twin of `codec.encode` on `device`, or None where there is none (the host encodes)."""
    chosen = getattr(codec, "chosen", None)  # an `auto` codec after its fit encodes as the codec it chose
    codec = chosen if chosen is not None else codec
    if isinstance(codec, Int8Codec):
        def int8(x):
            q, scale = quantize_int8(x)
            return {"values": q, "scale": scale}
        return int8
    if isinstance(codec, Fp16Codec):
        return lambda x: {"values": x.float().clamp(-_F16_MAX, _F16_MAX).to(torch.float16)}
    if isinstance(codec, PcaCodec) and codec.basis is not None:
        mean = torch.from_numpy(np.ascontiguousarray(codec.mean, dtype=np.float32)).to(device)
        basis = torch.from_numpy(np.ascontiguousarray(codec.basis, dtype=np.float32)).to(device)

        def pca(x):
            with _no_tf32():  # TF32 would cost the coefficients ~3 decimal digits
                coeffs = (x.float() - mean).reshape(-1, basis.shape[0]) @ basis
            coeffs = coeffs.reshape(x.shape[:-1] + (basis.shape[1],))
            if codec.quant == "fp16":
                return {"coeffs": coeffs.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)}
            q, scale = quantize_int8(coeffs)
            return {"coeffs": q, "scale": scale}
        return pca
    return None


def encoders(codecs: dict[str, Codec], targets, device: torch.device) -> dict[str, Encoder]:
    """target -> its device encoder, for the heavy targets among `targets` that have one."""
    out = {}
    for t in targets:
        if t in HEAVY and t in codecs:
            enc = encoder(codecs[t], torch.device(device))
            if enc is not None:
                out[t] = enc
    return out


def encode_outputs(out: dict[str, torch.Tensor], encs: dict[str, Encoder]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(raw targets left for the host, encoded parts of the others, (b,) finite flags of the encoded ones).
    A row with a non-finite value in any target is encoded as zeros (the writer drops it)."""
    finite = {t: torch.isfinite(v).flatten(1).all(1) for t, v in out.items()}
    ok = torch.stack(list(finite.values())).all(0)
    raw, parts = {}, {}
    for t, v in out.items():
        if t not in encs:
            raw[t] = v
            continue
        clean = torch.where(ok.view((-1,) + (1,) * (v.ndim - 1)), v, torch.zeros((), dtype=v.dtype, device=v.device))
        parts[t] = encs[t](clean)
    return raw, parts, {t: finite[t] for t in encs}


@contextmanager
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
