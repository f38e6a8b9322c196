"""The tiled kernel file: layout, mirrored reads, NumPy-style slicing, resume checks."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch

from engine.ntk import open_kernel
from engine.store import KernelTiles, StoreError
from tests.seeding import seeded


def _write(path, h: torch.Tensor, *, tile: int, symmetric: bool, job=None, kernel_shape=None, skip=()):
    m1, m2 = h.shape
    f = KernelTiles.create_for(path, job=job or {"kernel": "test"}, matrix_shape=(m1, m2),
                               kernel_shape=kernel_shape or (m1, m2), tile_rows=tile, tile_cols=tile,
                               symmetric=symmetric, n1=5, n2=None if symmetric else 4)
    with f.writer() as w:
        f.record_inputs(w, np.arange(5) * 3, np.arange(5) % 2, *(() if symmetric else (np.arange(4), np.ones(4))))
        for k, (i, j) in enumerate(f.grid()):
            if k in skip:
                continue
            r0, r1, c0, c1 = f.tile_bounds(i, j)
            f.write_tile(w, k, h[r0:r1, c0:c1])
    return f


def _sym(n, g):
    a = torch.randn(n, n + 3, generator=g)
    return a @ a.T


def test_symmetric_file_stores_upper_tiles_and_mirrors(tmp_path):
    g, seed = seeded()
    h = _sym(23, g)
    f = _write(tmp_path / "k.h5", h, tile=5, symmetric=True)
    assert f.n_tiles == 5 * 6 // 2  # 5x5 grid, upper triangle only
    K = open_kernel(tmp_path / "k.h5")
    assert K.shape == (23, 23) and K.is_complete and K.symmetric
    hn = h.numpy()
    full = K[:, :]
    assert np.array_equal(full, np.triu(hn) + np.triu(hn, 1).T), f"seed {seed}"
    # slices across tile edges, ints, steps (negative too), index arrays
    assert np.array_equal(K[3:17, 1:22], full[3:17, 1:22])
    assert np.array_equal(K[12:3:-2, ::3], full[12:3:-2, ::3])
    assert K[7, 19] == full[7, 19] and K[19, 7] == full[7, 19]
    assert np.array_equal(K[-1], full[-1]) and np.array_equal(K[:, 4], full[:, 4])
    assert np.array_equal(K[[0, 22, 5]], full[[0, 22, 5]])
    assert K[5:5, :].shape == (0, 23)
    assert np.array_equal(np.asarray(K), full)
    with pytest.raises(IndexError):
        K[23, 0]
    assert np.array_equal(K.x1_index, np.arange(5) * 3) and np.array_equal(K.x2_labels, np.arange(5) % 2)


def test_cross_file_and_edge_padding_on_disk(tmp_path):
    g, seed = seeded()
    h = torch.randn(11, 7, generator=g)
    _write(tmp_path / "c.h5", h, tile=4, symmetric=False)
    K = open_kernel(tmp_path / "c.h5")
    assert K.shape == (11, 7) and not K.symmetric
    assert np.array_equal(K[:], h.numpy()), f"seed {seed}"
    assert np.array_equal(K.x2_index, np.arange(4))
    # A reader in another language: tile k is grid cell tile_index[k], zero-padded to (4, 4).
    with h5py.File(tmp_path / "c.h5", "r") as f:
        tiles, index = f["data/tiles"][...], f["data/tile_index"][...]
    assert tiles.shape == (3 * 2, 4, 4) and index.tolist() == [[i, j] for i in range(3) for j in range(2)]
    assert np.array_equal(tiles[5, :3, :3], h[8:11, 4:7].numpy()) and not tiles[5, 3:].any()


def test_incomplete_tile_refused_and_other_job_refused(tmp_path):
    g, _ = seeded()
    h = _sym(9, g)
    _write(tmp_path / "k.h5", h, tile=4, symmetric=True, skip={1})
    K = open_kernel(tmp_path / "k.h5")
    assert not K.is_complete and K.complete.tolist() == [True, False, True, True, True, True]
    assert np.array_equal(K[:4, :4], h[:4, :4].numpy())
    with pytest.raises(StoreError, match=r"tile \(1, 0\).*5/6 tiles complete"):
        K[5, 0]
    # Same job reopens (resume); another job is refused in one line naming the field.
    KernelTiles.create_for(tmp_path / "k.h5", job={"kernel": "test"}, matrix_shape=(9, 9), kernel_shape=(9, 9),
                           tile_rows=4, tile_cols=4, symmetric=True, n1=5, n2=None)
    with pytest.raises(StoreError, match="differs in tile_cols, tile_rows") as e:
        KernelTiles.create_for(tmp_path / "k.h5", job={"kernel": "test"}, matrix_shape=(9, 9),
                               kernel_shape=(9, 9), tile_rows=3, tile_cols=3, symmetric=True, n1=5, n2=None)
    assert len(str(e.value).splitlines()) == 1


def test_diagonal_kernel_is_indexed_by_sample(tmp_path):
    g, seed = seeded()
    d = torch.randn(7, 3, 3, generator=g)
    f = KernelTiles.create_for(tmp_path / "d.h5", job={"kernel": "diagonal"}, matrix_shape=(7, 9),
                               kernel_shape=(7, 3, 3), tile_rows=3, tile_cols=9, symmetric=False, n1=7, n2=None)
    with f.writer() as w:
        f.record_inputs(w, np.arange(7), np.zeros(7))
        for k, (i, _) in enumerate(f.grid()):
            r0, r1, _, _ = f.tile_bounds(i, 0)
            f.write_tile(w, k, d[r0:r1].reshape(r1 - r0, 9))
    K = open_kernel(tmp_path / "d.h5")
    assert K.shape == (7, 3, 3)
    assert np.array_equal(K[:], d.numpy()), f"seed {seed}"
    assert np.array_equal(K[2:6, 1], d[2:6, 1].numpy()) and K[4, 2, 0] == d[4, 2, 0].item()


def test_not_a_kernel_file(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f.attrs["format"] = "other"
    msg = "is not an entk tiled kernel file (format attribute 'other', expected 'entk-kernel-tiles'"
    with pytest.raises(StoreError, match=re.escape(msg)):
        open_kernel(p)
