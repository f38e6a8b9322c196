"""Fetching the official python CIFAR-10 with torchvision."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .layout import DOWNLOAD_URL, PICKLE_DIR, one_line


def download(root: Path) -> Path:
    """Fetch the official python files into ``root`` with torchvision."""
    if root.name == PICKLE_DIR:  # torchvision extracts into <root>/cifar-10-batches-py
        root = root.parent
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # any failure (network, disk, checksum) means the same to the user
        raise DataError(
            f"downloading CIFAR-10 into {root} failed ({type(e).__name__}: {one_line(e)}); "
            f"fetch {DOWNLOAD_URL} yourself and extract it so that {root / PICKLE_DIR} holds "
            f"data_batch_1..5 and test_batch, or pass a JPEG tree or archive instead"
        ) from e
    return root / PICKLE_DIR
