"""Shared fixtures: tiny real shards (Fashion-MNIST's first images), a shard with corrupt members."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory):
    """Fashion-MNIST train (first 300 images, shards of 100) and test (first 100, shards of 50)."""
    from tools.make_shards import make_fashion_mnist

    root = tmp_path_factory.mktemp("fmnist")
    written = make_fashion_mnist(root, shard_size=100, limit=300, splits=("train",))
    # test split in smaller shards so two DataLoader workers both get work
    from tools.make_shards import FASHION_MNIST_CLASSES, load_fashion_mnist
    from kt.shards import write_shards

    images, labels = load_fashion_mnist("test")
    test = write_shards(((f"test-{i:05d}", Image.fromarray(images[i], mode="L"), int(labels[i])) for i in range(100)),
                        root / "test", prefix="test", maxcount=50, classes=FASHION_MNIST_CLASSES)
    return {"root": root, "train": written["train"], "test": test}


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def corrupt_shard(tmp_path):
    """One shard of 8 samples: 6 good, one truncated PNG, one member that is not an image."""
    from kt.shards import write_shards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        data = png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        if i == 3:
            samples.append({"__key__": f"s{i}", "png": data[: len(data) // 2], "cls": b"0"})
        elif i == 5:
            samples.append({"__key__": f"s{i}", "txt": b"not an image", "cls": b"1"})
        else:
            samples.append({"__key__": f"s{i}", "png": data, "cls": str(i % 2).encode()})
    return write_shards(samples, tmp_path / "bad", prefix="bad", maxcount=100)
