"""The files the bad-input tables refuse to touch (tests/test_cli_refusals.py, tests/test_api_refusals.py):
a small run, kernels made from it (some wrong on purpose, some damaged), garbage and a directory where
a file is expected, and two CIFAR-shaped JPEG trees; and a snapshot to prove a refusal changed none."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from engine.cli import main

SMALL = ["--model", "cnn", "--n-train", "200", "--n-test", "100", "--batch-size", "20", "--eval-train", "100",
         "--quiet"]


def snapshot(d: Path) -> dict[str, str]:
    """Every file under ``d`` with the hash of its bytes (directories by name), but the data cache's
    (a decoded source is cached when it is first read: a cache, not an output of the command)."""
    snap = {}
    for p in sorted(d.rglob("*")):
        key = str(p.relative_to(d))
        if key.split(os.sep)[0] == "cache":
            continue
        snap[key] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return snap


def _write_tile(path: Path, k: int, fill) -> None:
    """Replace tile ``k`` of a stored kernel as a job would write it (a valid store holding a bad value)."""
    from engine.store import KernelTiles

    f = KernelTiles(path)
    tr, tc = f.tile_shape
    block = torch.from_numpy(np.array(f.memmap("tiles")[k]))
    fill(block)
    with f.writer() as w:
        w.write("tiles", k, block.reshape(1, tr, tc))
        w.mark_complete(k)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def _jpeg_tree(root: Path, seed: int) -> Path:
    """A tiny CIFAR-shaped JPEG tree (10 classes, 4 train and 2 test images each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("test", 2)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def make_files(d: Path) -> Path:
    """Fill ``d`` with the files every refusal case names, through the CLI as a user would make them."""
    run = str(d / "run.h5")
    assert main(["train", *SMALL, "--steps", "4", "--checkpoints", "0", "--out", run]) == 0
    common = ["--run", run, "--tile", "6", "--quiet"]
    assert main(["kernel", *common, "--x1", "train:12", "--out", str(d / "ktr.h5")]) == 0
    assert main(["kernel", *common, "--x1", "test:6", "--x2", "train:12", "--out", str(d / "kte.h5")]) == 0
    assert main(["kernel", *common, "--x1", "train:6", "--kernel", "diagonal", "--out", str(d / "kdiag.h5")]) == 0
    for name, fill in (("knan.h5", lambda b: b[1, 2].fill_(float("nan"))),
                       ("kasym.h5", lambda b: b[1, 2].add_(1.0))):
        shutil.copy(d / "ktr.h5", d / name)
        _write_tile(d / name, 0, fill)
    from engine.store import KernelTiles

    for name, src, off in (("kdamaged.h5", "ktr.h5", KernelTiles(d / "ktr.h5").datasets["tiles"].offset + 10),
                           ("rundamaged.h5", "run.h5", 1057)):  # a tile; the run's HDF5 metadata
        shutil.copy(d / src, d / name)
        _flip(d / name, off)
    (d / "garbage.pt").write_bytes(b"this is not a pickle\n" * 10)
    (d / "statedir").mkdir()
    _jpeg_tree(d / "treeA", 1)
    _jpeg_tree(d / "treeB", 2)
    cache = d / "cache"
    assert main(["train", "--model", "cnn", "--data", "cifar10", "--data-root", str(d / "treeA"), "--cache-dir",
                 str(cache), "--batch-size", "10", "--eval-train", "10", "--steps", "2", "--quiet",
                 "--out", str(d / "runA.h5")]) == 0
    return d
