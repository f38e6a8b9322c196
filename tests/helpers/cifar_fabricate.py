"""Fabricated CIFAR-10 sources for the data tests: a few tiny random JPEGs per class in a
folder tree, tar archives of it, the official pickles, and the helpers that compare and load them."""

from __future__ import annotations

import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import load_cifar10
from engine.data.dataset import CIFAR10_CLASSES

# Ten classes, deliberately not CIFAR's names: labels must follow the sorted folder names.
CLASSES = ("cat", "dog", "eel", "fox", "gnu", "hen", "owl", "pig", "rat", "yak")


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    """A random ``size`` = (width, height) RGB JPEG at ``path``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def make_tree(root: Path, classes=CLASSES, n_train: int = 3, n_test: int = 2) -> Path:
    """``root/train/<class>/NNNN.jpg`` and ``root/test/...``, written out of name order."""
    seed = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for i in reversed(range(n)):  # creation order != name order
                write_jpeg(root / split / c / f"{i:04d}.jpg", seed)
                seed += 1
    return root


def make_tar(src: Path, out: Path, prefix: str = "") -> Path:
    """Archive ``src/train`` and ``src/test`` at ``out`` (compression from the suffix)."""
    mode = "w:gz" if out.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(out, mode) as tf:
        for split in ("train", "test"):
            tf.add(src / split, arcname=f"{prefix}{split}")
    return out


def make_pickles(folder: Path, rows: int = 4) -> dict[str, np.ndarray]:
    """The official ``cifar-10-batches-py`` files with ``rows`` rows each; returns the data."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, rows)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def pil_decode(path: Path) -> torch.Tensor:
    """Reference decode: PIL RGB as ``(3, H, W)`` uint8."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())


def assert_same(a, b) -> None:
    assert a.classes == b.classes
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def load(path, **kw):
    """load_cifar10 without touching the user's cache, unless a cache_dir is given."""
    return load_cifar10(path, **{"cache_dir": False, "progress": False, **kw})


def error_of(exc_type, path, fn, *args, **kwargs) -> str:
    """Call fn and return its one-line error message, which must name ``path``."""
    with pytest.raises(exc_type, match=re.escape(str(path))) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg
