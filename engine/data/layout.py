"""Where CIFAR-10 is and in which form: names, folder layouts and cheap checks (nothing decoded).

:func:`detect_layout` tells the sources apart from names and folders alone; :func:`list_tree`
checks a JPEG tree's layout and lists its files. Every problem is a one-line
:class:`~engine.errors.DataError` naming the path and what was expected.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError, DataError, DataNotFoundError
from .dataset import CIFAR10_CLASSES

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


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def pickle_dir(root: Path) -> Path | None:
    """``root`` or ``root/cifar-10-batches-py`` if it looks like the official python files."""
    for d in (root, root / PICKLE_DIR):
        if d.is_dir() and (d.name == PICKLE_DIR or (d / TRAIN_BATCHES[0]).is_file()):
            return d
    return None


def jpeg_tree(root: Path) -> Path | None:
    """``root`` if it holds train/ or test/, else its single sub-folder that does."""
    if any((root / s).is_dir() for s in SPLITS):
        return root
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subs) == 1 and any((subs[0] / s).is_dir() for s in SPLITS):
        return subs[0]
    return None


def pickles_complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in (*TRAIN_BATCHES, TEST_BATCH))


def check_pickles_present(names: Iterable[str], where: str) -> None:
    """Raise a DataError naming ``where`` unless every batch file is among ``names``."""
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in set(names)]
    if missing:
        raise DataError(
            f"{where} is missing {', '.join(missing)}; expected data_batch_1..5 and test_batch "
            f"(and batches.meta) of the official python CIFAR-10 ({DOWNLOAD_URL})"
        )


def class_dirs(split_dir: Path) -> list[str]:
    """Sorted class folder names under ``split_dir`` (hidden folders ignored)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_classes(where: str, train: Iterable[str], test: Iterable[str]) -> list[str]:
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


def check_ten_classes(where: str, classes: Iterable[str], what: str = "class folders") -> None:
    """Refuse a source whose class count is not CIFAR-10's: 9 class folders are not CIFAR-10.

    The names may differ from CIFAR-10's (labels follow the sorted folder names); the count may not.
    """
    classes = list(classes)
    if len(classes) != len(CIFAR10_CLASSES):
        raise DataError(
            f"{where} has {len(classes)} {what} ({', '.join(classes)}); CIFAR-10 has "
            f"{len(CIFAR10_CLASSES)} ({', '.join(CIFAR10_CLASSES)})"
        )


def list_tree(root: Path) -> tuple[list[str], dict[str, list[tuple[int, Path]]]]:
    """Classes and, per split, ``(label, file)`` in order; checks the layout, decodes nothing."""
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(
                f"{root} has no {split}/ folder; expected {root}/train/<class>/*.jpg "
                f"and {root}/test/<class>/*.jpg"
            )
    found = {s: class_dirs(root / s) for s in SPLITS}
    for split, classes in found.items():
        if not classes:
            raise DataError(f"{root / split} has no class folders; expected {split}/<class>/*.jpg")
    classes = check_classes(str(root), found["train"], found["test"])
    check_ten_classes(str(root), classes)
    files: dict[str, list[tuple[int, Path]]] = {}
    for split in SPLITS:
        files[split] = []
        for label, c in enumerate(classes):
            d = root / split / c
            images = sorted(p for p in d.iterdir() if p.is_file() and is_image_name(p.name))
            if not images:
                raise DataError(f"class folder {d} has no images (*.jpg, *.jpeg, *.png)")
            files[split] += [(label, p) for p in images]
    return classes, files


def detect_layout(root: Path, source: str = "auto", download: bool = False) -> tuple[str, Path]:
    """``(layout, path)``: ``"pickle-dir"``, ``"jpeg-dir"`` or ``"archive"``, and where; or
    ``("download", root)`` when ``download`` is set and the official files must be fetched
    into ``root`` first (:func:`engine.data.download.download`).

    Only looks at names and folders (cheap).
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown CIFAR-10 source {source!r}; valid: {', '.join(SOURCES)}")
    can_download = download and source != "jpeg"
    if not root.exists():
        if can_download:
            return "download", root
        hint = " (or pass download=True to fetch it)" if source != "jpeg" else ""
        raise DataNotFoundError(f"CIFAR-10 data not found: {root} does not exist{hint}; {EXPECTED}")
    if root.is_file():
        if not is_archive(root):
            raise DataError(f"{root} is not a CIFAR-10 source (a file but not a tar archive); "
                            f"{EXPECTED}")
        return "archive", root
    pickles = pickle_dir(root) if source != "jpeg" else None
    if pickles is not None and (pickles_complete(pickles) or not can_download):
        return "pickle-dir", pickles
    tree = jpeg_tree(root) if source != "pickle" else None
    if tree is not None:
        return "jpeg-dir", tree
    if can_download:
        return "download", root
    if source == "pickle":
        raise DataError(f"{root} has no official python CIFAR-10 files (source='pickle'); expected "
                        f"data_batch_1..5 and test_batch in {root} or {root / PICKLE_DIR}")
    if source == "jpeg":
        raise DataError(f"{root} has no JPEG tree (source='jpeg'); expected "
                        f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
    raise DataError(f"{root} is not a CIFAR-10 source (no cifar-10-batches-py files, "
                    f"no train/ and test/ folders); {EXPECTED}")
