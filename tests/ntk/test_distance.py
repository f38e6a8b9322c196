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


def _naive(kernels, dtype=torch.float64):
    """1 − cos over every pair with plain torch ops in ``dtype``: float64 is the reference,
    float32 the same-precision yardstick for the fused backends."""
    t = len(kernels)
    s = torch.zeros(t, t, dtype=dtype)
    for i in range(t):
        for j in range(t):
            a, b = kernels[i].to(dtype), kernels[j].to(dtype)
            s[i, j] = 1 - (a * b).sum() / (a.norm() * b.norm())
    return s


def _naive32(kernels):
    return _naive(kernels, torch.float32)


@pytest.mark.parametrize("t", [1, 2, 3, 17])
@pytest.mark.parametrize("m", [1, 7, 123])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pairwise_matches_naive_loop(t, m, symmetric):
    ks = _kernels(t, m, symmetric)
    ref = _naive(ks)
    for backend in ("torch", "auto"):
        s = pairwise_kernel_distance(ks, tile_rows=5, backend=backend, symmetric=symmetric)
        assert s.dtype == torch.float64 and s.shape == (t, t)
        assert torch.equal(s, s.T) and torch.all(torch.diagonal(s) == 0)
        if backend == "torch":
            # float64 of float32 inputs on both sides: the difference is float64 rounding.
            torch.testing.assert_close(s, ref, rtol=0, atol=64 * torch.finfo(torch.float64).eps * m)
        else:
            # float32 tile sums: at most 4x the error of plain torch's float32 distances.
            err, err32 = float((s - ref).abs().max()), float((_naive32(ks).double() - ref).abs().max())
            assert err <= 4 * max(err32, torch.finfo(torch.float32).eps), (err, err32)


def test_symmetric_mode_reads_half_and_agrees():
    ks = _kernels(3, 60)
    assert torch.allclose(kernel_gram(ks, symmetric=True, backend="torch"), kernel_gram(ks, backend="torch"),
                          rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match="square"):
        kernel_gram([torch.ones(3, 4)], symmetric=True)


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
            rows, cols = idx
            reads.append((rows.stop - rows.start) * (self.shape[1] - (cols.start or 0)))
            return self.a[idx]

    arrays = [k.numpy() for k in _kernels(5, 50)]
    s = pairwise_kernel_distance([Spy(a) for a in arrays], tile_rows=8)
    assert max(reads) <= 8 * 50 and sum(reads) == 5 * 50 * 50
    reads.clear()
    s = pairwise_kernel_distance([Spy(a) for a in arrays], tile_rows=8, symmetric=True)
    assert sum(reads) < 5 * 50 * 50 * 0.6  # upper triangle (plus the diagonal tiles' lower halves)
    torch.testing.assert_close(s, _naive([torch.from_numpy(a) for a in arrays]))


def test_memmap_kernels(tmp_path):
    ks = _kernels(3, 20)
    maps = []
    for i, k in enumerate(ks):
        mm = np.lib.format.open_memmap(tmp_path / f"k{i}.npy", mode="w+", dtype=np.float32, shape=tuple(k.shape))
        mm[:] = k.numpy()
        mm.flush()
        maps.append(np.load(tmp_path / f"k{i}.npy", mmap_mode="r"))
    torch.testing.assert_close(pairwise_kernel_distance(maps, symmetric=True), _naive(ks))


def test_gram_of_kernels_is_float64_inner_products():
    ks = _kernels(3, 9)
    g = kernel_gram(ks, tile_rows=4, backend="torch")
    ref = torch.tensor([[float((a.double() * b.double()).sum()) for b in ks] for a in ks], dtype=torch.float64)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_kernel_is_reported_by_index(bad):
    ks = _kernels(4, 10)
    ks[2][3, 4] = bad
    for backend in ("torch", "auto"):
        with pytest.raises(KernelValueError, match=r"kernel\(s\) \[2\].*NaN or Inf"):
            pairwise_kernel_distance(ks, backend=backend)
    ks[2][4, 3] = bad  # a symmetric kernel has it in its upper triangle too
    with pytest.raises(KernelValueError, match=r"kernel\(s\) \[2\].*NaN or Inf"):
        pairwise_kernel_distance(ks, symmetric=True)


def test_zero_kernel_and_shape_mismatch():
    with pytest.raises(KernelValueError, match=r"\[1\] are zero"):
        pairwise_kernel_distance([torch.eye(3), torch.zeros(3, 3)])
    with pytest.raises(ConfigError, match="different shapes"):
        pairwise_kernel_distance([torch.eye(3), torch.eye(4)])
    with pytest.raises(ConfigError, match="at least one"):
        pairwise_kernel_distance([])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "ext", "triton", "auto"])
def test_pairwise_on_cuda(backend):
    ks = [k.cuda() for k in _kernels(5, 300)]
    ref = _naive([k.cpu() for k in ks])
    s = pairwise_kernel_distance(ks, symmetric=True, device="cuda", backend=backend, tile_rows=77)
    err, err32 = float((s.cpu() - ref).abs().max()), float((_naive32([k.cpu() for k in ks]).double() - ref).abs().max())
    assert err <= 4 * max(err32, torch.finfo(torch.float32).eps), (backend, err, err32)
    ks[3][10, 250] = float("nan")
    with pytest.raises(KernelValueError, match=r"\[3\]"):
        pairwise_kernel_distance(ks, device="cuda", backend=backend)


def test_bfloat16_kernels_stored_as_bits(tmp_path):
    """KernelStore keeps bfloat16 kernels as uint16 bits; they are read as bfloat16 tiles."""
    ks = [k.bfloat16() for k in _kernels(3, 40)]
    maps = []
    for i, k in enumerate(ks):
        mm = np.lib.format.open_memmap(tmp_path / f"b{i}.npy", mode="w+", dtype=np.uint16, shape=tuple(k.shape))
        mm[:] = k.view(torch.int16).numpy().view(np.uint16)
        mm.flush()
        maps.append(np.load(tmp_path / f"b{i}.npy", mmap_mode="r"))
    ref = _naive([k.double() for k in ks])
    for backend in ("torch", "auto"):
        s = pairwise_kernel_distance(maps, symmetric=True, backend=backend)
        err, err32 = float((s - ref).abs().max()), float((_naive32(ks).double() - ref).abs().max())
        assert err <= 4 * max(err32, torch.finfo(torch.float32).eps), (backend, err, err32)


@pytest.mark.parametrize("m,r0,r1", [(37, 0, 37), (37, 5, 20), (1000, 333, 517), (48, 32, 48), (17, 16, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_staged_cuda_tiles_are_aligned_and_place_the_diagonal(m, r0, r1, dtype):
    """The CUDA path's tile staging (run here on the CPU): rows start on 16-element
    boundaries, the padding is zeros, and with its diag_offset the staged tile contributes
    exactly what the unaligned tile [r0, r1) × [r0, m) does."""
    from engine.ntk.distance import ROW_ALIGN, _staged
    from engine.ops.kernel_pairs import kernel_pairs_reference

    ks = [k.to(dtype) for k in _kernels(3, m)]
    sources = [ks[0], ks[1].float().numpy() if dtype == torch.float32 else ks[1], ks[2]]
    x, off = _staged(sources, r0, r1, r0, torch.device("cpu"), dtype)
    assert x.dtype == dtype and x.shape[:2] == (3, r1 - r0)
    assert x.stride(1) % ROW_ALIGN == 0 and x.shape[2] % ROW_ALIGN == 0
    c0 = r0 + off
    assert 0 <= r0 - c0 < ROW_ALIGN and c0 % ROW_ALIGN == 0
    assert torch.equal(x[:, :, m - c0:], torch.zeros_like(x[:, :, m - c0:]))
    for i, k in enumerate(ks):
        assert torch.equal(x[i, :, : m - c0], k[r0:r1, c0:])
    unaligned = torch.stack([k[r0:r1, r0:] for k in ks])
    # Both float64: only the summation order differs (zeros and skipped elements reorder it).
    torch.testing.assert_close(kernel_pairs_reference(x, symmetric=True, diag_offset=off),
                               kernel_pairs_reference(unaligned, symmetric=True, diag_offset=0),
                               rtol=m * torch.finfo(torch.float64).eps, atol=0)
