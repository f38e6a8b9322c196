"""Data sources refused with one line naming the path: missing paths, wrong layouts and sizes,
not ten classes, empty folders, undecodable JPEGs, truncated or fake archives, failed downloads,
bad arguments (fabricated sources from tests/helpers/cifar_fabricate.py)."""

from __future__ import annotations

import os
import pickle
import tarfile

import pytest

from engine.data import load_cifar10, load_dataset
from engine.data.dataset import CIFAR10_CLASSES
from engine.data.synthetic import load_synthetic
from engine.errors import ConfigError, DataError, DataNotFoundError
from tests.helpers.cifar_fabricate import (
    CLASSES,
    assert_same,
    error_of,
    load,
    make_pickles,
    make_tar,
    make_tree,
    write_jpeg,
)

# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    msg = error_of(DataNotFoundError, missing, load, missing)
    assert "train/<class>" in msg and "cifar-10-batches-py" in msg


def test_wrong_layouts(tmp_path):
    junk = tmp_path / "junk"
    (junk / "a").mkdir(parents=True)
    (junk / "b").mkdir()
    assert "train/" in error_of(DataError, junk, load, junk)

    only_train = tmp_path / "only_train"
    write_jpeg(only_train / "train" / "cat" / "0.jpg", 0)
    assert "test/" in error_of(DataError, only_train, load, only_train)

    tree = make_tree(tmp_path / "tree")
    assert "source='pickle'" in error_of(DataError, tree, load, tree, source="pickle")

    odd = make_tree(tmp_path / "odd")
    (odd / "test" / "dog").rename(odd / "test" / "bird")
    msg = error_of(DataError, odd, load, odd)
    assert "differ" in msg and "dog" in msg and "bird" in msg

    not_archive = tmp_path / "data.zip"
    not_archive.write_bytes(b"PK")
    error_of(DataError, not_archive, load, not_archive)

    flat = tmp_path / "flat.tar.gz"
    with tarfile.open(flat, "w:gz") as tf:
        tf.add(odd / "train" / "cat" / "0000.jpg", arcname="0000.jpg")
    assert "0000.jpg" in error_of(DataError, flat, load, flat)


def test_wrong_image_size(tmp_path):
    root = make_tree(tmp_path / "tree")
    bad = root / "train" / "dog" / "0001.jpg"
    write_jpeg(bad, 5, size=(33, 32))
    assert "33x32" in error_of(DataError, bad, load, root)
    archive = make_tar(root, tmp_path / "data.tar.gz")
    msg = error_of(DataError, archive, load, archive)
    assert "train/dog/0001.jpg" in msg and "33x32" in msg


def test_not_ten_classes_is_refused(tmp_path):
    """A folder with 9 classes is not CIFAR-10: one line naming the classes found and the 10 expected."""
    root = make_tree(tmp_path / "tree", classes=CLASSES[:9])
    msg = error_of(DataError, root, load, root)
    assert "9 class folders" in msg and ", ".join(CLASSES[:9]) in msg
    assert ", ".join(CIFAR10_CLASSES) in msg
    archive = make_tar(root, tmp_path / "data.tar.gz")
    msg = error_of(DataError, archive, load, archive)
    assert "9 class folders" in msg and ", ".join(CIFAR10_CLASSES) in msg
    folder = tmp_path / "cifar-10-batches-py"
    make_pickles(folder)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES[:9]]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    assert "9 label names" in error_of(DataError, folder / "batches.meta", load, folder)


def test_empty_class_folder(tmp_path):
    root = make_tree(tmp_path / "tree")
    empty = root / "test" / "dog"
    for f in empty.iterdir():
        f.unlink()
    error_of(DataError, empty, load, root)
    archive = make_tar(root, tmp_path / "data.tar.gz")
    assert "test/dog" in error_of(DataError, archive, load, archive)


@pytest.mark.parametrize("garbage", [b"not a jpeg at all" * 20, b"\xff\xd8\xff\xe0" + bytes(300)])
def test_undecodable_jpeg(tmp_path, garbage):
    root = make_tree(tmp_path / "tree")
    bad = root / "test" / "cat" / "0000.jpg"
    bad.write_bytes(garbage)
    msg = error_of(DataError, bad, load, root)
    assert "decode" in msg
    assert "BytesIO" not in msg and " at 0x" not in msg  # the file is named, not PIL's buffer
    archive = make_tar(root, tmp_path / "data.tar.gz")
    msg = error_of(DataError, archive, load, archive)
    assert "test/cat/0000.jpg" in msg and "BytesIO" not in msg and " at 0x" not in msg


def test_truncated_or_fake_archives(tmp_path):
    root = make_tree(tmp_path / "tree", n_train=6, n_test=6)
    whole = make_tar(root, tmp_path / "data.tar.gz").read_bytes()
    for cut in (len(whole) // 3, len(whole) - 40):
        cut_gz = tmp_path / f"cut{cut}.tar.gz"
        cut_gz.write_bytes(whole[:cut])
        error_of(DataError, cut_gz, load, cut_gz)

    # A plain tar cut exactly at a member boundary: tarfile alone would just stop there.
    plain = make_tar(root, tmp_path / "data.tar")
    with tarfile.open(plain) as tf:
        offset = tf.getmembers()[10].offset
    cut_tar = tmp_path / "cut.tar"
    cut_tar.write_bytes(plain.read_bytes()[:offset])
    error_of(DataError, cut_tar, load, cut_tar)

    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(os.urandom(5000))
    error_of(DataError, fake, load, fake)


def test_download_failure_is_explained(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    target = tmp_path / "dl"
    msg = error_of(DataError, target, load, target, download=True)
    assert "download" in msg and "cifar-10-python.tar.gz" in msg


def test_bad_arguments():
    with pytest.raises(ConfigError, match="source"):
        load_cifar10(".", source="png")
    with pytest.raises(ConfigError, match="--data-root"):
        load_dataset("cifar10")
    with pytest.raises(ConfigError, match="cifar10, synthetic"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="n_classes"):
        load_dataset("synthetic", n_classes=3)


def test_load_dataset_dispatch(tmp_path):
    root = make_tree(tmp_path / "tree")
    assert_same(load_dataset("cifar10", root, cache_dir=False, progress=False), load(root))
    syn = load_dataset("synthetic", n_train=20, n_test=10, seed=3)
    assert_same(syn, load_synthetic(20, 10, seed=3))
