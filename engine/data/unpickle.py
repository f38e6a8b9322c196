"""The official python CIFAR-10 batches, read with an unpickler that refuses foreign code."""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import DataError
from .cache import Arrays
from .dataset import CIFAR10_CLASSES
from .layout import (
    IMAGE_SIZE,
    META_BATCH,
    PICKLE_FILES,
    TEST_BATCH,
    TRAIN_BATCHES,
    check_pickles_present,
    check_ten_classes,
    one_line,
)


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts but refuses any other global.

    A pickle can run arbitrary code on load; the official batches only need
    numpy's array reconstruction, so nothing else is allowed.
    """

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    })

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 moved core
        return getattr(importlib.import_module(module), name)


def _unpickle(data: bytes, where: str) -> dict:
    """Load one batch pickle (keys as ``str``), one-line DataError on failure."""
    try:
        d = _NumpyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise DataError(f"cannot read CIFAR-10 batch {where}: {one_line(e)}") from e
    if not isinstance(d, dict):
        raise DataError(f"CIFAR-10 batch {where} holds a {type(d).__name__}, expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _batch_arrays(d: dict, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from a batch dict."""
    x, y = d.get("data"), d.get("labels")
    n_pix = 3 * IMAGE_SIZE * IMAGE_SIZE
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != n_pix:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"CIFAR-10 batch {where}: 'data' is {got}, expected uint8 (N, {n_pix})")
    y = np.asarray(y if y is not None else [], dtype=np.int64)
    if y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise DataError(
            f"CIFAR-10 batch {where}: 'labels' must be {len(x)} ints in [0, {num_classes}), "
            f"got shape {y.shape}"
        )
    return x.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), y
def arrays_from_pickles(files: dict[str, bytes], where: str) -> tuple[Arrays, dict]:
    """Arrays and meta from the official batch files (name → bytes) found at ``where``."""
    check_pickles_present(files, where)
    classes = list(CIFAR10_CLASSES)
    if META_BATCH in files:
        names = _unpickle(files[META_BATCH], f"{where}/{META_BATCH}").get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            check_ten_classes(f"{where}/{META_BATCH}", classes, "label names")
    batches = {n: _batch_arrays(_unpickle(files[n], f"{where}/{n}"), f"{where}/{n}", len(classes))
               for n in (*TRAIN_BATCHES, TEST_BATCH)}
    arrays = {
        "x_train": np.concatenate([batches[n][0] for n in TRAIN_BATCHES]),
        "y_train": np.concatenate([batches[n][1] for n in TRAIN_BATCHES]),
        "x_test": batches[TEST_BATCH][0],
        "y_test": batches[TEST_BATCH][1],
    }
    return arrays, {"classes": classes}


def read_pickle_dir(folder: Path, show: bool | None = None) -> tuple[Arrays, dict]:
    """Read a ``cifar-10-batches-py`` folder (every file checked present first; no bar)."""
    names = [n for n in PICKLE_FILES if (folder / n).is_file()]
    check_pickles_present(names, str(folder))  # before reading anything
    arrays, meta = arrays_from_pickles({n: (folder / n).read_bytes() for n in names}, str(folder))
    return arrays, {**meta, "layout": "pickle-dir"}
