"""CIFAR-10 from whatever form it is on disk, decoded once and cached.

Sources (``source="auto"`` tells them apart from what ``root`` is):

* ``"pickle"``: torchvision's official python files, a ``cifar-10-batches-py``
  folder (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``)
  or its parent.
  ``download=True`` fetches them with torchvision when missing.
* ``"jpeg"``: a tree ``train/<class>/*.jpg`` + ``test/<class>/*.jpg`` (optionally
  inside one top folder), or a ``.tar.gz``/``.tgz``/``.tar`` archive of it, read
  in one streaming pass. Classes are the folder names sorted, labels their index;
  files are sorted by name within a class. An archive of the official pickles
  (``cifar-10-python.tar.gz``) is read too.

Decoded sources are cached by :mod:`engine.data.cache` (pixels, labels and the
per-channel statistics), so later loads take ~0.1 s. Every problem with
the data is a one-line :class:`~engine.errors.DataError` naming the path and what
was expected; cheap checks (existence, layout, class folders) come before decoding.
"""

from __future__ import annotations

import bz2
import gzip
import importlib
import inspect
import io
import os
import pickle
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..errors import ConfigError, DataError, DataNotFoundError
from ..progress import progress as progress_bar
from .cache import Arrays, cache_key, cached, default_cache_dir, fingerprint
from .dataset import CIFAR10_CLASSES, Dataset
from .synthetic import channel_stats, load_synthetic

try:  # lzma is optional in CPython builds
    import lzma
    from lzma import LZMAError
except ImportError:  # pragma: no cover
    lzma = None
    LZMAError = OSError

SOURCES = ("auto", "pickle", "jpeg")
SPLITS = ("train", "test")
IMAGE_SIZE = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
PICKLE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_BATCH = "batches.meta"
PICKLE_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_BATCH)
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
EXPECTED = (
    "expected one of: a cifar-10-batches-py folder (data_batch_1..5, test_batch) or its "
    "parent; a folder with train/<class>/*.jpg and test/<class>/*.jpg; "
    "a .tar.gz/.tgz/.tar archive of either"
)
# Errors a damaged or non-tar archive raises while streaming (gzip: zlib.error,
# EOFError; tarfile: ReadError/StreamError; bz2: OSError).
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, LZMAError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- images


def _jpeg_decoder() -> tuple[Callable | None, int]:
    """torchvision's C++ JPEG decoding op and its RGB mode code, or ``(None, 0)``.

    The op is called directly because its Python wrapper
    ``torchvision.io.decode_jpeg`` emits a DeprecationWarning on every call since
    torchvision 0.29 (60,000 per decode of CIFAR-10) and costs ~0.5 s per 60,000.
    """
    try:
        from torchvision.io import ImageReadMode  # loads the image extension

        return torch.ops.image.decode_jpeg, ImageReadMode.RGB.value
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
        return None, 0


_DECODE_JPEG, _RGB = _jpeg_decoder()


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode one JPEG (or PNG) to uint8 ``(3, 32, 32)``; ``where`` names it in errors.

    torchvision's libjpeg-turbo op decodes the 60,000 JPEGs of the real CIFAR-10
    archive in 1.6 s against ~6 s for ``PIL.Image.open(...).convert("RGB")`` (2
    CPU cores), with bit-identical pixels. PIL is the fallback for anything the
    op rejects (PNG, odd JPEGs) and when torchvision's image extension is missing.
    """
    img = None
    if _DECODE_JPEG is not None and data[:2] == b"\xff\xd8":  # JPEG start-of-image marker
        try:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = _DECODE_JPEG(buf, _RGB, False).numpy()
        except RuntimeError:
            img = None
    if img is None:
        img = _decode_pil(data, where)
    if img.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        h, w = img.shape[1:]
        raise DataError(
            f"image {where} is {w}x{h} (width x height), expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    return img


def _decode_pil(data: bytes, where: str) -> np.ndarray:
    """PIL decode to ``(3, H, W)`` uint8, any failure as a one-line DataError."""
    # Imported here: the GPU image may lack Pillow, and only decoding needs it.
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(
            f"cannot decode image {where}: not a valid JPEG or PNG ({_one_line(e)})"
        ) from e


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


# --------------------------------------------------------------------------- pickles


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
        raise DataError(f"cannot read CIFAR-10 batch {where}: {_one_line(e)}") from e
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


def _check_pickles_present(names: Iterable[str], where: str) -> None:
    """Raise a DataError naming ``where`` unless every batch file is among ``names``."""
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in set(names)]
    if missing:
        raise DataError(
            f"{where} is missing {', '.join(missing)}; expected data_batch_1..5 and test_batch "
            f"(and batches.meta) of the official python CIFAR-10 ({DOWNLOAD_URL})"
        )


def arrays_from_pickles(files: dict[str, bytes], where: str) -> tuple[Arrays, dict]:
    """Arrays and meta from the official batch files (name → bytes) found at ``where``."""
    _check_pickles_present(files, where)
    classes = list(CIFAR10_CLASSES)
    if META_BATCH in files:
        names = _unpickle(files[META_BATCH], f"{where}/{META_BATCH}").get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    batches = {n: _batch_arrays(_unpickle(files[n], f"{where}/{n}"), f"{where}/{n}", len(classes))
               for n in (*TRAIN_BATCHES, TEST_BATCH)}
    arrays = {
        "x_train": np.concatenate([batches[n][0] for n in TRAIN_BATCHES]),
        "y_train": np.concatenate([batches[n][1] for n in TRAIN_BATCHES]),
        "x_test": batches[TEST_BATCH][0],
        "y_test": batches[TEST_BATCH][1],
    }
    return arrays, {"classes": classes}


def _read_pickle_dir(folder: Path, show: bool | None = None) -> tuple[Arrays, dict]:
    """Read a ``cifar-10-batches-py`` folder (every file checked present first; no bar)."""
    names = [n for n in PICKLE_FILES if (folder / n).is_file()]
    _check_pickles_present(names, str(folder))  # before reading anything
    arrays, meta = arrays_from_pickles({n: (folder / n).read_bytes() for n in names}, str(folder))
    return arrays, {**meta, "layout": "pickle-dir"}


# --------------------------------------------------------------------------- JPEG tree


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted class folder names under ``split_dir`` (hidden folders ignored)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes(where: str, train: Iterable[str], test: Iterable[str]) -> list[str]:
    """The sorted class list, after checking train/ and test/ have the same class folders."""
    train, test = sorted(set(train)), sorted(set(test))
    if train != test:
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise DataError(
            f"{where}: class folders differ between train/ and test/ "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})"
        )
    return train


def _list_tree(root: Path) -> tuple[list[str], dict[str, list[tuple[int, Path]]]]:
    """Classes and, per split, ``(label, file)`` in order; checks the layout, decodes nothing."""
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(
                f"{root} has no {split}/ folder; expected {root}/train/<class>/*.jpg "
                f"and {root}/test/<class>/*.jpg"
            )
    found = {s: _class_dirs(root / s) for s in SPLITS}
    for split, classes in found.items():
        if not classes:
            raise DataError(f"{root / split} has no class folders; expected {split}/<class>/*.jpg")
    classes = _check_classes(str(root), found["train"], found["test"])
    files: dict[str, list[tuple[int, Path]]] = {}
    for split in SPLITS:
        files[split] = []
        for label, c in enumerate(classes):
            d = root / split / c
            images = sorted(p for p in d.iterdir() if p.is_file() and _is_image_name(p.name))
            if not images:
                raise DataError(f"class folder {d} has no images (*.jpg, *.jpeg, *.png)")
            files[split] += [(label, p) for p in images]
    return classes, files


def _decode_rows(rows: dict[str, list[tuple[int, str, bytes | Path]]], show: bool | None,
                 desc: str) -> Arrays:
    """Decode ``{split: [(label, where, bytes or file)]}`` into ``x_<split>``/``y_<split>``.

    ``x_<split>`` is uint8 ``(N, 3, 32, 32)``, ``y_<split>`` int64 ``(N,)``, in row order.
    """
    arrays: Arrays = {}
    total = sum(len(v) for v in rows.values())
    with progress_bar(total=total, desc=desc, unit="img", enabled=show) as bar:
        for split, items in rows.items():
            x = np.empty((len(items), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            for i, (_, where, data) in enumerate(items):
                x[i] = decode_image(data.read_bytes() if isinstance(data, Path) else data, where)
                bar.update()
            arrays[f"x_{split}"] = x
            arrays[f"y_{split}"] = np.array([label for label, *_ in items], dtype=np.int64)
    return arrays


def _decode_tree(root: Path, show: bool | None) -> tuple[Arrays, dict]:
    """Decode a ``train/<class>/*.jpg`` + ``test/<class>/*.jpg`` tree (layout checked first)."""
    classes, files = _list_tree(root)
    rows = {s: [(label, str(p), p) for label, p in files[s]] for s in SPLITS}
    return _decode_rows(rows, show, f"decoding {root.name}"), {
        "classes": classes, "layout": "jpeg-dir"}


# --------------------------------------------------------------------------- archive


class _CountingReader(io.RawIOBase):
    """A read-only file wrapper that advances a progress bar by the bytes read."""

    def __init__(self, f, bar):
        self.f, self.bar = f, bar

    def readable(self):
        return True

    def seekable(self):
        return self.f.seekable()

    def seek(self, offset, whence=io.SEEK_SET):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def read(self, n=-1):
        data = self.f.read(n)
        self.bar.update(len(data))
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _CheckedTarInfo(tarfile.TarInfo):
    """TarInfo whose header parsing fails loudly on a truncated or damaged archive.

    ``TarFile.next`` treats an empty, truncated or invalid header after the
    first member as the end of the archive, so an archive cut at a member
    boundary would silently load fewer images. Only the end-of-archive marker
    (a zero block) may end it.
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(
                f"bad or missing member header at byte {tarfile_.offset} ({e})"
            ) from None


class _ArchiveScan:
    """What one streaming pass over an archive found: image bytes, class folders, pickles.

    Images are only read here and decoded afterwards, once the layout is known to
    be right: reading and decoding interleaved took ~5.5 s on the real archive
    against ~1.9 s + ~2.5 s done one after the other (2 CPU cores).
    """

    def __init__(self, path: Path):
        self.path = path
        # (prefix, split, class, file name, member name, bytes)
        self.images: list[tuple[tuple[str, ...], str, str, str, str, bytes]] = []
        self.class_dirs: set[tuple[tuple[str, ...], str, str]] = set()  # (prefix, split, class)
        self.pickles: dict[str, bytes] = {}
        self.top: set[str] = set()

    def add(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        """Record member ``m``; keep its bytes if it is an image at ``[top/]split/class/file``."""
        # str.split, not PurePosixPath: 60,000 members, ~0.7 s saved
        parts = tuple(p for p in m.name.split("/") if p not in ("", "."))
        if not parts:
            return
        self.top.add(parts[0])
        if m.isdir():
            if len(parts) in (2, 3) and parts[-2] in SPLITS:
                self.class_dirs.add((parts[:-2], parts[-2], parts[-1]))
        elif not m.isfile():
            return
        elif len(parts) in (3, 4) and parts[-3] in SPLITS and _is_image_name(parts[-1]):
            data = tf.extractfile(m).read()
            self.images.append((parts[:-3], parts[-3], parts[-2], parts[-1], m.name, data))
        elif parts[-1] in PICKLE_FILES and (len(parts) == 1 or parts[-2] == PICKLE_DIR):
            self.pickles[parts[-1]] = tf.extractfile(m).read()

    def layout(self) -> tuple[list[str], dict[str, list[tuple[int, str, bytes]]]]:
        """Classes and, per split, ``(label, where, bytes)`` sorted like a tree; checks layout."""
        prefix = self._prefix()
        files = {(s, c): [] for p, s, c in self.class_dirs if p == prefix}
        for p, s, c, name, member, data in self.images:
            if p == prefix:
                files.setdefault((s, c), []).append((name, member, data))
        by_split = {s: {c for (s2, c) in files if s2 == s} for s in SPLITS}
        for split in SPLITS:
            if not by_split[split]:
                raise DataError(
                    f"{self.path} has no {split}/<class>/ images; expected "
                    f"train/<class>/*.jpg and test/<class>/*.jpg members"
                )
        classes = _check_classes(str(self.path), by_split["train"], by_split["test"])
        rows: dict[str, list[tuple[int, str, bytes]]] = {}
        for split in SPLITS:
            rows[split] = []
            for label, c in enumerate(classes):
                items = sorted(files[(split, c)], key=lambda t: t[0])
                if not items:
                    raise DataError(f"class folder {split}/{c}/ in {self.path} has no images")
                rows[split] += [(label, f"{member} in {self.path}", d) for _, member, d in items]
        return classes, rows

    def _prefix(self) -> tuple[str, ...]:
        """The one folder path wrapping train/ and test/ (``()`` for none)."""
        prefixes = {img[0] for img in self.images} or {p for p, *_ in self.class_dirs}
        if not prefixes:
            seen = ", ".join(sorted(self.top)[:6]) or "nothing"
            raise DataError(
                f"{self.path} has no train/<class>/*.jpg or test/<class>/*.jpg members "
                f"(top level holds: {seen}); {EXPECTED}"
            )
        if len(prefixes) > 1:
            names = ", ".join(sorted("/".join(p) + "/" if p else "./" for p in prefixes))
            raise DataError(f"{self.path} has train/ and test/ under several folders ({names})")
        return prefixes.pop()


def _decompressed(raw):
    """``raw`` (a binary file) decompressed by its magic bytes: gzip, bzip2, xz or none.

    Decompressing here instead of in ``tarfile.open(mode="r|*")`` is what detects
    a truncated download: tarfile's stream reader checks neither the gzip CRC nor
    its end marker, so an archive cut in the trailer or padding loads silently.
    """
    head = raw.read(6)
    raw.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(raw)
    if head == b"\xfd7zXZ\x00" and lzma is not None:
        return lzma.LZMAFile(raw)
    return raw


def _scan_archive(path: Path, show: bool | None) -> _ArchiveScan:
    """Read every member of a tar archive in one streaming pass (no decoding).

    The stream is read to its end after the tar end marker, so that the
    decompressor verifies its checksum and length.
    """
    scan = _ArchiveScan(path)
    with (
        open(path, "rb") as f,
        progress_bar(total=path.stat().st_size, desc=f"reading {path.name}", unit="B",
                     unit_scale=True, enabled=show) as bar,
    ):
        try:
            stream = _decompressed(_CountingReader(f, bar))
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo) as tf:
                for m in tf:
                    scan.add(tf, m)
            while stream.read(1 << 20):
                pass
        except ARCHIVE_ERRORS as e:
            raise DataError(
                f"cannot read archive {path}: {_one_line(e)}; expected a complete "
                f".tar.gz/.tgz/.tar (truncated download or not a tar archive?)"
            ) from e
    return scan


def _decode_archive(path: Path, show: bool | None) -> tuple[Arrays, dict]:
    """Decode a tar archive of a JPEG tree (or of the official pickles).

    Measured on the real CIFAR-10 JPEG archive (19 MB .tar.gz, 60,000 JPEGs, 2
    CPU cores): ~1.9 s to stream and gunzip, ~2.5 s to decode, ~5.0 s in all.
    """
    scan = _scan_archive(path, show)
    if not scan.images and scan.pickles:
        arrays, meta = arrays_from_pickles(scan.pickles, str(path))
        return arrays, {**meta, "layout": "pickle-archive"}
    classes, rows = scan.layout()
    scan.images.clear()  # rows hold what is still needed
    return _decode_rows(rows, show, f"decoding {path.name}"), {
        "classes": classes, "layout": "jpeg-archive"}


# --------------------------------------------------------------------------- detection


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _pickle_dir(root: Path) -> Path | None:
    """``root`` or ``root/cifar-10-batches-py`` if it looks like the official python files."""
    for d in (root, root / PICKLE_DIR):
        if d.is_dir() and (d.name == PICKLE_DIR or (d / TRAIN_BATCHES[0]).is_file()):
            return d
    return None


def _jpeg_tree(root: Path) -> Path | None:
    """``root`` if it holds train/ or test/, else its single sub-folder that does."""
    if any((root / s).is_dir() for s in SPLITS):
        return root
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subs) == 1 and any((subs[0] / s).is_dir() for s in SPLITS):
        return subs[0]
    return None


def _pickles_complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in (*TRAIN_BATCHES, TEST_BATCH))


def _download(root: Path) -> Path:
    """Fetch the official python files into ``root`` with torchvision."""
    if root.name == PICKLE_DIR:  # torchvision extracts into <root>/cifar-10-batches-py
        root = root.parent
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # any failure (network, disk, checksum) means the same to the user
        raise DataError(
            f"downloading CIFAR-10 into {root} failed ({type(e).__name__}: {_one_line(e)}); "
            f"fetch {DOWNLOAD_URL} yourself and extract it so that {root / PICKLE_DIR} holds "
            f"data_batch_1..5 and test_batch, or pass a JPEG tree or archive instead"
        ) from e
    return root / PICKLE_DIR


def detect_layout(root: Path, source: str = "auto", download: bool = False) -> tuple[str, Path]:
    """``(layout, path)``: ``"pickle-dir"``, ``"jpeg-dir"`` or ``"archive"``, and where.

    Only looks at names and folders (cheap); may download when ``download``.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown CIFAR-10 source {source!r}; valid: {', '.join(SOURCES)}")
    can_download = download and source != "jpeg"
    if not root.exists():
        if can_download:
            return "pickle-dir", _download(root)
        hint = " (or pass download=True to fetch it)" if source != "jpeg" else ""
        raise DataNotFoundError(f"CIFAR-10 data not found: {root} does not exist{hint}; {EXPECTED}")
    if root.is_file():
        if not _is_archive(root):
            raise DataError(f"{root} is not a CIFAR-10 source (a file but not a tar archive); "
                            f"{EXPECTED}")
        return "archive", root
    pickles = _pickle_dir(root) if source != "jpeg" else None
    if pickles is not None and (_pickles_complete(pickles) or not can_download):
        return "pickle-dir", pickles
    tree = _jpeg_tree(root) if source != "pickle" else None
    if tree is not None:
        return "jpeg-dir", tree
    if can_download:
        return "pickle-dir", _download(root)
    if source == "pickle":
        raise DataError(f"{root} has no official python CIFAR-10 files (source='pickle'); expected "
                        f"data_batch_1..5 and test_batch in {root} or {root / PICKLE_DIR}")
    if source == "jpeg":
        raise DataError(f"{root} has no JPEG tree (source='jpeg'); expected "
                        f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
    raise DataError(f"{root} is not a CIFAR-10 source (no cifar-10-batches-py files, "
                    f"no train/ and test/ folders); {EXPECTED}")


# --------------------------------------------------------------------------- API


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
    t0 = time.perf_counter()
    decode = {"pickle-dir": _read_pickle_dir, "jpeg-dir": _decode_tree}.get(layout, _decode_archive)
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


DATASETS = ("cifar10", "synthetic")


def load_dataset(name: str, root: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Load a dataset by name: ``"cifar10"`` (needs ``root``) or ``"synthetic"``.

    ``kwargs`` go to :func:`load_cifar10` or :func:`~engine.data.synthetic.load_synthetic`.
    """
    key = str(name).strip().lower()
    if key == "cifar10":
        if root is None:
            raise ConfigError(
                "dataset 'cifar10' needs its location: pass --data-root PATH (root=PATH), a "
                "cifar-10-batches-py folder, a train/ + test/ JPEG tree or its .tar.gz"
            )
        return _call(load_cifar10, root, **kwargs)
    if key == "synthetic":
        return _call(load_synthetic, **kwargs)
    raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def _call(fn: Callable, *args, **kwargs) -> Dataset:
    """``fn(*args, **kwargs)``, with unknown keyword names as a ConfigError."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = ", ".join(p for p in params if p != "root")
        raise ConfigError(f"{fn.__name__} does not take {', '.join(unknown)}; it takes {valid}")
    return fn(*args, **kwargs)
