"""Kernel distances: streaming pairwise pass vs a naive float64 loop; bad kernels refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.ntk.distance import KernelValueError, kernel_distance, kernel_gram, pairwise_kernel_distance


def _kernels(t, m, symmetric=True):
    out = []
    for _ in range(t):
        a = torch.randn(m, max(m // 2, 1))
        out.append(a @ a.T if symmetric else torch.randn(m, m))
    return out


def _naive(kernels):
    t = len(kernels)
    s = torch.zeros(t, t, dtype=torch.float64)
    for i in range(t):
        for j in range(t):
            a, b = kernels[i].double(), kernels[j].double()
            s[i, j] = 1 - (a * b).sum() / (a.norm() * b.norm())
    return s


@pytest.mark.parametrize("t", [1, 2, 3, 17])
@pytest.mark.parametrize("m", [1, 7, 123])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pairwise_matches_naive_loop(t, m, symmetric):
    ks = _kernels(t, m, symmetric)
    s = pairwise_kernel_distance(ks, tile_rows=5)
    ref = _naive(ks)
    assert s.dtype == torch.float64 and s.shape == (t, t)
    assert torch.equal(s, s.T) and torch.all(torch.diagonal(s) == 0)
    # Both sides are float64 of float32 inputs: the difference is float64 rounding.
    torch.testing.assert_close(s, ref, rtol=0, atol=64 * torch.finfo(torch.float64).eps * m)


def test_two_kernel_distance_known_values():
    a = torch.eye(4)
    assert kernel_distance(a, 3 * a) == pytest.approx(0.0, abs=1e-15)   # scale-invariant
    b = torch.zeros(4, 4)
    b[0, 1] = b[1, 0] = 1.0
    assert kernel_distance(a, b) == pytest.approx(1.0)                  # orthogonal
    assert kernel_distance(a, -a) == pytest.approx(2.0)
    c = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert kernel_distance(a, c) == pytest.approx(1 - 2 / (2 * math.sqrt(2)))


def test_streams_tiles_never_whole_kernels(tmp_path):
    """Each access reads at most tile_rows rows of one kernel, and every row exactly once."""
    reads = []

    class Spy:
        def __init__(self, a):
            self.a, self.shape = a, a.shape

        def __getitem__(self, idx):
            reads.append(idx.stop - idx.start)
            return self.a[idx]

    arrays = [k.numpy() for k in _kernels(5, 50)]
    s = pairwise_kernel_distance([Spy(a) for a in arrays], tile_rows=8)
    assert max(reads) <= 8 and sum(reads) == 5 * 50
    torch.testing.assert_close(s, _naive([torch.from_numpy(a) for a in arrays]))


def test_memmap_kernels(tmp_path):
    ks = _kernels(3, 20)
    maps = []
    for i, k in enumerate(ks):
        mm = np.lib.format.open_memmap(tmp_path / f"k{i}.npy", mode="w+", dtype=np.float32, shape=tuple(k.shape))
        mm[:] = k.numpy()
        mm.flush()
        maps.append(np.load(tmp_path / f"k{i}.npy", mmap_mode="r"))
    torch.testing.assert_close(pairwise_kernel_distance(maps), _naive(ks))


def test_gram_of_kernels_is_float64_inner_products():
    ks = _kernels(3, 9)
    g = kernel_gram(ks, tile_rows=4)
    ref = torch.tensor([[float((a.double() * b.double()).sum()) for b in ks] for a in ks], dtype=torch.float64)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_kernel_is_reported_by_index(bad):
    ks = _kernels(4, 10)
    ks[2][3, 4] = bad
    with pytest.raises(KernelValueError, match=r"kernel\(s\) \[2\].*NaN or Inf"):
        pairwise_kernel_distance(ks)


def test_zero_kernel_and_shape_mismatch():
    with pytest.raises(KernelValueError, match=r"\[1\] are zero"):
        pairwise_kernel_distance([torch.eye(3), torch.zeros(3, 3)])
    with pytest.raises(ConfigError, match="different shapes"):
        pairwise_kernel_distance([torch.eye(3), torch.eye(4)])
    with pytest.raises(ConfigError, match="at least one"):
        pairwise_kernel_distance([])
