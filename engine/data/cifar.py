"""CIFAR-10 from whatever form it is on disk, decoded once and cached.

The concerns live beside this module: :mod:`.layout` (names, layouts, detection),
:mod:`.jpeg` (decoding), :mod:`.archive` (tar streaming), :mod:`.unpickle` (the
official batches), :mod:`.download`, and :mod:`.registry` (datasets by name).

Sources (``source="auto"`` tells them apart from what ``root`` is):

* ``"pickle"``: torchvision's official python files, a ``cifar-10-batches-py``
  folder (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``)
  or its parent.
  ``download=True`` fetches them with torchvision when missing.
* ``"jpeg"``: a tree ``train/<class>/*.jpg`` + ``test/<class>/*.jpg`` (optionally
  inside one top folder), or a ``.tar.gz``/``.tgz``/``.tar`` archive of it, read
  in one streaming pass. Classes are the folder names sorted (ten of them, any names),
  labels their index; files are sorted by name within a class. An archive of the
  official pickles (``cifar-10-python.tar.gz``) is read too.

Decoded sources are cached by :mod:`engine.data.cache` (pixels, labels and the
per-channel statistics), so later loads take ~0.1 s. Every problem with
the data is a one-line :class:`~engine.errors.DataError` naming the path and what
was expected; cheap checks (existence, layout, class folders) come before decoding.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from .archive import decode_archive
from .cache import Arrays, cache_key, cached, default_cache_dir, fingerprint
from .dataset import Dataset
from .download import download as fetch_official
from .jpeg import decode_tree
from .layout import detect_layout
from .synthetic import channel_stats
from .unpickle import read_pickle_dir


def load_cifar10(
    root: str | os.PathLike,
    *,
    source: str = "auto",
    cache_dir: str | os.PathLike | bool | None = None,
    download: bool = False,
    progress: bool | None = None,
) -> Dataset:
    """CIFAR-10 as a :class:`Dataset`: uint8 ``(N, 3, 32, 32)`` images, int64 labels.

    The full dataset has 50,000 train and 10,000 test images; smaller sources in
    the same layouts load too. ``source``: ``"auto"``, ``"pickle"`` or ``"jpeg"``
    (see the module docstring). ``cache_dir``: where decoded sources are
    cached, default :func:`default_cache_dir`; ``False`` disables the cache.
    ``progress``: show a bar while decoding (default: when stderr is a terminal).
    ``mean``/``std`` are computed from the train split (on the official data they
    equal the published CIFAR-10 statistics).
    """
    root = Path(root).expanduser()
    layout, path = detect_layout(root, source, download)
    if layout == "download":
        layout, path = "pickle-dir", fetch_official(path)
    t0 = time.perf_counter()
    decode = {"pickle-dir": read_pickle_dir, "jpeg-dir": decode_tree}.get(layout, decode_archive)
    key = cache_key(fingerprint(path), dataset="cifar10", layout=layout)
    if cache_dir is None or cache_dir is True:
        cache_dir = default_cache_dir()
    store = None if cache_dir is False else cache_dir
    arrays, meta, status = cached(store, "cifar10", key, partial(_build, decode, path, progress))
    elapsed = round(time.perf_counter() - t0, 3)
    return Dataset(
        name="cifar10",
        x_train=torch.from_numpy(arrays["x_train"]),
        y_train=torch.from_numpy(arrays["y_train"]),
        x_test=torch.from_numpy(arrays["x_test"]),
        y_test=torch.from_numpy(arrays["y_test"]),
        classes=tuple(meta["classes"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        source=str(path.resolve()),
        meta={"layout": meta.get("layout", layout), "cache": status, "cache_key": key,
              "load_s": elapsed, "decode_s": meta.get("decode_s")},
    )


def _stats(arrays: Arrays) -> dict:
    mean, std = channel_stats(torch.from_numpy(arrays["x_train"]))
    return {"mean": list(mean), "std": list(std)}


def _build(decode: Callable, path: Path, show: bool | None) -> tuple[Arrays, dict]:
    """Decode ``path`` and add what the cache stores with it (stats, timing)."""
    t0 = time.perf_counter()
    arrays, meta = decode(path, show)
    return arrays, {"source": str(path), **meta, **_stats(arrays),
                    "decode_s": round(time.perf_counter() - t0, 3)}
