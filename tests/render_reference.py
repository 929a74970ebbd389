"""Test inputs for the render tests (real photographs, encodings, the pixel difference they are judged by);
the first rendering implementation itself lives in `kt.render_v1`, re-exported here under its old names."""

from __future__ import annotations

import numpy as np
from PIL import Image

from kt.render_v1 import render, render_mask  # noqa: F401  (the reference, under the names tests use)


# ---------------------------------------------------------------------------------------- test inputs
def photos() -> dict[str, Image.Image]:
    """Real photographs bundled with scikit-image / scikit-learn at the sizes the tests use: a typical
    500x375 (4:3) photo and a square one, plus a grey one; textured synthetics where they are missing."""
    out = {}
    try:
        from skimage import data

        out["chelsea_500x375"] = Image.fromarray(data.chelsea()).resize((500, 375), Image.Resampling.LANCZOS)
        out["astronaut_256"] = Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.LANCZOS)
        out["camera_grey_200"] = Image.fromarray(data.camera()).resize((200, 200), Image.Resampling.LANCZOS)
    except ImportError:
        y, x = np.mgrid[0:375, 0:500] / 100.0
        rgb = np.stack([np.sin(3 * x) * np.cos(2 * y), np.sin(x * y), np.cos(5 * x + y)], -1)
        out["synthetic_500x375"] = Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8))
    return out


def encode(img: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def mad(a, b) -> float:
    """Mean absolute difference in 0..255 units."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())
