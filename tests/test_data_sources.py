"""Data sources: real CIFAR-10, fabricated JPEG trees/archives/pickles, errors, synthetic.

The fabricated sources are a few tiny JPEGs per class written with PIL, so the
layout handling, ordering, caching and error paths are checked in milliseconds;
the real archive (decoded once per session by the ``cifar10`` fixture) checks
counts and pixel statistics.
"""

from __future__ import annotations

import os
import pickle
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import load_cifar10, load_dataset
from engine.data.cache import CACHE_VERSION, default_cache_dir, entry_dir
from engine.data.dataset import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from engine.data.synthetic import channel_stats, load_synthetic
from engine.errors import ConfigError, DataError, DataNotFoundError

# Ten classes, deliberately not CIFAR's names: labels must follow the sorted folder names.
CLASSES = ("cat", "dog", "eel", "fox", "gnu", "hen", "owl", "pig", "rat", "yak")


# --------------------------------------------------------------------------- fabricators


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


# --------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_real_cifar10_shapes_counts_classes(cifar10):
    assert cifar10.x_train.shape == (50000, 3, 32, 32)
    assert cifar10.x_test.shape == (10000, 3, 32, 32)
    assert cifar10.x_train.dtype == torch.uint8 and cifar10.y_train.dtype == torch.int64
    assert cifar10.classes == CIFAR10_CLASSES
    assert cifar10.y_train.bincount(minlength=10).tolist() == [5000] * 10
    assert cifar10.y_test.bincount(minlength=10).tolist() == [1000] * 10


@pytest.mark.real_data
def test_real_cifar10_pixel_statistics(cifar10):
    """Per-channel mean/std match the published CIFAR-10 values (JPEG shifts them < 0.01)."""
    x = cifar10.x_train
    mean = [x[:, c].float().mean().item() / 255 for c in range(3)]
    assert mean == pytest.approx(CIFAR10_MEAN, abs=0.01)
    assert cifar10.mean == pytest.approx(mean, abs=1e-3)
    assert cifar10.std == pytest.approx(CIFAR10_STD, abs=0.01)


@pytest.mark.real_data
def test_real_cifar10_reload_from_cache_is_fast_and_identical(cifar10, cifar_archive,
                                                              data_cache_dir):
    t0 = time.perf_counter()
    again = load_cifar10(cifar_archive, cache_dir=data_cache_dir, progress=False)
    elapsed = time.perf_counter() - t0
    assert again.meta["cache"] == "hit"
    assert elapsed < 1.0, f"cache load took {elapsed:.2f} s"
    assert_same(again, cifar10)
    assert again.mean == cifar10.mean


# --------------------------------------------------------------------------- fabricated sources


def test_tree_labels_order_and_pixels(tmp_path):
    root = make_tree(tmp_path / "tree")
    d = load(root)
    assert d.classes == CLASSES
    assert d.y_train.tolist() == [label for label in range(10) for _ in range(3)]
    assert d.y_test.tolist() == [label for label in range(10) for _ in range(2)]
    assert d.x_train.shape == (30, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    # Sorted by name within a class, and the fast decoder agrees with PIL bit for bit.
    assert torch.equal(d.x_train[1], pil_decode(root / "train" / "cat" / "0001.jpg"))
    assert torch.equal(d.x_test[3], pil_decode(root / "test" / "dog" / "0001.jpg"))
    assert d.mean == channel_stats(d.x_train)[0]


@pytest.mark.parametrize(
    ("name", "prefix"),
    [("data.tar.gz", ""), ("data.tgz", ""), ("data.tar", ""), ("data.tar.gz", "cifar10/")],
)
def test_archives_match_tree(tmp_path, name, prefix):
    root = make_tree(tmp_path / "tree")
    archive = make_tar(root, tmp_path / name, prefix=prefix)
    assert_same(load(archive, progress=True), load(root))


def test_tree_wrapped_in_one_folder(tmp_path):
    make_tree(tmp_path / "outer" / "cifar10")
    assert_same(load(tmp_path / "outer"), load(tmp_path / "outer" / "cifar10"))


def test_official_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = make_pickles(folder)
    for root in (tmp_path, folder):
        d = load(root)
        assert d.meta["layout"] == "pickle-dir"
        assert d.classes == CIFAR10_CLASSES
        assert len(d.y_train) == 20 and len(d.y_test) == 4  # any size loads
        labels = [v for i in range(1, 6) for v in written[f"data_batch_{i}"][1]]
        assert d.y_train.tolist() == labels
        assert d.y_test.tolist() == written["test_batch"][1]
        # Rows are channel-major: the first 1024 values are the red plane.
        row = written["data_batch_2"][0][1]
        assert torch.equal(d.x_train[5], torch.from_numpy(row.reshape(3, 32, 32)))
    # The official archive layout (cifar-10-python.tar.gz) reads the same.
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    assert_same(load(archive), load(folder))


def test_pickle_with_foreign_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_pickles(folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    msg = error_of(DataError, folder / "data_batch_3", load, folder)
    assert "refusing" in msg


def test_cache_hit_then_invalidated_by_changes(tmp_path):
    cache = tmp_path / "cache"
    root = make_tree(tmp_path / "tree")
    archive = make_tar(root, tmp_path / "data.tar.gz")
    first = load(archive, cache_dir=cache)
    assert first.meta["cache"] == "miss"
    second = load(archive, cache_dir=cache)
    assert second.meta["cache"] == "hit"
    assert_same(first, second)

    # Same bytes, new mtime: a new key, decoded again.
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load(archive, cache_dir=cache).meta["cache"] == "miss"

    # Rewritten with a changed image: decoded again, and the new pixels are served.
    write_jpeg(root / "train" / "cat" / "0000.jpg", seed=999)
    make_tar(root, archive)
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    changed = load(archive, cache_dir=cache)
    assert changed.meta["cache"] == "miss"
    assert torch.equal(changed.x_train[0], pil_decode(root / "train" / "cat" / "0000.jpg"))
    assert not torch.equal(changed.x_train[0], first.x_train[0])

    # A folder source: adding a file changes its fingerprint.
    assert load(root, cache_dir=cache).meta["cache"] == "miss"
    assert load(root, cache_dir=cache).meta["cache"] == "hit"
    write_jpeg(root / "train" / "dog" / "0003.jpg", seed=1000)
    tree = load(root, cache_dir=cache)
    assert tree.meta["cache"] == "miss" and len(tree.y_train) == 31


def test_moving_an_image_between_class_folders_invalidates_the_cache(tmp_path):
    """A move keeps the file count, the total bytes and the newest mtime, yet changes a label:
    the cache must not serve the old labels."""
    cache = tmp_path / "cache"
    root = make_tree(tmp_path / "tree")
    before = load(root, cache_dir=cache)
    assert load(root, cache_dir=cache).meta["cache"] == "hit"
    src, dst = root / "train" / "cat" / "0000.jpg", root / "train" / "dog" / "0009.jpg"
    pixels = pil_decode(src)
    os.replace(src, dst)  # a rename: same inode, size and mtime
    after = load(root, cache_dir=cache)
    assert after.meta["cache"] == "miss"
    assert_same(after, load(root))  # what a fresh decode gives
    assert after.y_train.bincount().tolist()[:2] == [2, 4]
    assert before.y_train.bincount().tolist()[:2] == [3, 3]
    assert torch.equal(after.x_train[2 + 3], pixels)  # dog/0009.jpg is the last dog image
    assert after.y_train[5] == 1

def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    archive = make_tar(make_tree(tmp_path / "tree"), tmp_path / "data.tar.gz")
    good = load(archive, cache_dir=cache)
    entry = entry_dir(cache, "cifar10", good.meta["cache_key"])
    x = entry / "x_train.npy"
    x.write_bytes(x.read_bytes()[:200])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="rebuilding corrupt cache entry"):
        rebuilt = load(archive, cache_dir=cache)
    assert rebuilt.meta["cache"] == "miss"
    assert_same(rebuilt, good)
    assert load(archive, cache_dir=cache).meta["cache"] == "hit"


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    archive = make_tar(make_tree(tmp_path / "tree"), tmp_path / "data.tar.gz")
    real_save = np.save
    calls = []

    def save_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        load(archive, cache_dir=cache)
    monkeypatch.setattr(np, "save", real_save)
    assert list(cache.iterdir()) == []  # no half entry, no temp folder
    assert load(archive, cache_dir=cache).meta["cache"] == "miss"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ENTK_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ENTK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "entk"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "entk"
    assert CACHE_VERSION >= 1


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


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_balanced():
    a = load_synthetic(200, 100, seed=1)
    assert_same(a, load_synthetic(200, 100, seed=1))
    b = load_synthetic(200, 100, seed=2)
    assert not torch.equal(a.x_train, b.x_train)
    assert a.x_train.shape == (200, 3, 32, 32) and a.x_test.shape == (100, 3, 32, 32)
    assert a.y_train.bincount().tolist() == [20] * 10
    assert a.y_test.bincount().tolist() == [10] * 10
    assert a.classes == tuple(f"class{i}" for i in range(10))
    assert (a.mean, a.std) == channel_stats(a.x_train)
    small = load_synthetic(30, 12, num_classes=3, image_size=16)
    assert small.x_train.shape == (30, 3, 16, 16) and small.y_train.bincount().tolist() == [10] * 3


@pytest.mark.skipif(not torch.__version__.startswith("2.14."),
                    reason="pinned bits were recorded with torch 2.14 (the pinned dependency)")
def test_synthetic_bits_are_pinned():
    """Guards reproducibility of past runs: the generator's output must not drift."""
    d = load_synthetic(20, 10, seed=0)
    assert int(d.x_train.long().sum()) == SYNTHETIC_SUM_TRAIN
    assert d.y_train.tolist()[:10] == SYNTHETIC_LABELS


# Recorded with torch 2.14.1 (CPU generator); update only on a deliberate change.
SYNTHETIC_SUM_TRAIN = 7371225
SYNTHETIC_LABELS = [5, 3, 2, 1, 9, 8, 1, 9, 4, 7]


def test_synthetic_full_size_is_quick():
    t0 = time.perf_counter()
    d = load_synthetic()
    assert time.perf_counter() - t0 < 10
    assert len(d.y_train) == 50000 and len(d.y_test) == 10000


def test_synthetic_is_learnable_but_not_trivial():
    """Nearest class mean on raw pixels: far above chance (10%), far from perfect."""
    d = load_synthetic(2000, 1000, seed=0)
    x, xt = d.x_train.float().flatten(1), d.x_test.float().flatten(1)
    means = torch.stack([x[d.y_train == c].mean(0) for c in range(10)])
    acc = (torch.cdist(xt, means).argmin(1) == d.y_test).float().mean().item()
    assert 0.35 < acc < 0.95, acc
