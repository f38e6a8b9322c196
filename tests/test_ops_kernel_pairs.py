"""kernel_pair_products: every backend against a float64 reference on fresh random inputs.

Tolerance (tests/_tolerance.py): a backend's error against float64 may be at most 4x the
error of plain torch at the same precision (a float32 matmul of the weighted, flattened
tiles; for bfloat16 inputs the same float32 matmul of the upcast values, since bf16
products are exact in float32 and both accumulate in float32). Each entry is also checked
on its own, relative to its Cauchy-Schwarz scale sqrt(G_ii G_jj), so one unwritten or
wrong entry cannot hide in a Frobenius norm.
"""

from __future__ import annotations

import os

import pytest
import torch
from _tolerance import assert_close_to_torch

from engine.errors import ConfigError
from engine.ops import BackendUnavailableError, kernel_pair_products, kernel_pairs_reference
from engine.ops import ext as ops_ext
from engine.ops.kernel_pairs import weights
from tests.seeding import seeded

SIZES = [(1, 1, 1), (2, 7, 7), (3, 123, 123), (17, 33, 125), (1, 1000, 1000), (2, 1025, 1025)]


def _fresh(t: int, r: int, n: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    # Fresh inputs every run (the seed is reported on failure); non-zero mean so that inner
    # products are far from zero too.
    gen, _ = seeded()
    x = torch.randn(t, r, n, generator=gen) + 0.5 * torch.rand(t, 1, 1, generator=gen)
    return x.to(device=device, dtype=dtype)


def _torch32(x: torch.Tensor, symmetric: bool, d: int) -> torch.Tensor:
    x32 = x.float()
    t = x.shape[0]
    y = x32
    if symmetric:
        w = weights(x.shape[1], x.shape[2], d, device=x.device, dtype=torch.float32)
        x32 = torch.where(w > 0, x32, 0.0)
        y = x32 * w
    return y.reshape(t, -1) @ x32.reshape(t, -1).T


def _entry_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = torch.sqrt(torch.diagonal(ref).abs()[:, None] * torch.diagonal(ref).abs()[None, :]).clamp_min(1e-300)
    return float(((a.double() - ref) / scale).abs().max())


def check(fast: torch.Tensor, x: torch.Tensor, symmetric: bool, d: int, what: str) -> None:
    ref = kernel_pairs_reference(x.cpu(), symmetric=symmetric, diag_offset=d)
    same = _torch32(x.cpu(), symmetric, d)
    assert fast.dtype == torch.float64 and fast.shape == ref.shape, what
    assert torch.equal(fast, fast.T), f"{what}: not exactly symmetric"
    assert_close_to_torch(fast.cpu(), same, ref, what=what)
    eps = torch.finfo(torch.float32).eps
    e_fast, e_torch = _entry_err(fast.cpu(), ref), _entry_err(same, ref)
    assert e_fast <= 4 * max(e_torch, eps), f"{what}: worst entry error {e_fast:.3g} vs torch's {e_torch:.3g}"


def _ext_or_skip():
    try:
        return ops_ext.load("cpu")
    except BackendUnavailableError as e:
        if os.environ.get("CI"):
            raise  # CI machines have a compiler: the C++ kernel must build there
        pytest.skip(str(e))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 2, 3, 17])
@pytest.mark.parametrize("m", [1, 7, 123, 1000, 1025])
def test_ext_cpu_matches_reference(m, t, dtype, symmetric):
    """Square tiles M×M (a whole kernel) and a non-square strip of it, at several diagonals."""
    _ext_or_skip()
    x = _fresh(t, m, m, dtype=dtype)
    for d in ((0, 3, -2) if symmetric else (0,)):
        g = kernel_pair_products(x, symmetric=symmetric, diag_offset=d, backend="ext")
        check(g, x, symmetric, d, f"ext T={t} M={m} {dtype} sym={symmetric} d={d}")
    strip = x[:, m // 3:m // 3 + max(1, m // 5)]  # rows [r0, r1) of every kernel, all columns
    check(kernel_pair_products(strip, symmetric=symmetric, diag_offset=-(m // 3), backend="ext"), strip,
          symmetric, -(m // 3), f"ext strip T={t} M={m}")


def test_reference_equals_the_definition_on_symmetric_kernels():
    # Upper triangle with weights == the full matrices' inner products, for symmetric H.
    h = torch.randn(3, 37, 37, dtype=torch.float64)
    h = h + h.transpose(1, 2)
    full = torch.einsum("irc,jrc->ij", h, h)
    assert torch.allclose(kernel_pairs_reference(h, symmetric=True), full, rtol=1e-12, atol=0)
    assert torch.allclose(kernel_pairs_reference(h, symmetric=False), full, rtol=1e-12, atol=0)


def test_tiles_sum_to_the_whole():
    # Streaming: row tiles [r0, r1) x columns [r0, M) with diag_offset 0 add up to the whole.
    _ext_or_skip()
    m = 301
    h = torch.randn(4, m, m)
    h = (h + h.transpose(1, 2)).contiguous()
    whole = kernel_pairs_reference(h, symmetric=False)
    parts = sum(kernel_pair_products(h[:, r0:r0 + 64, r0:], symmetric=True, backend="ext")
                for r0 in range(0, m, 64))
    same = _torch32(h, False, 0)  # plain float32 torch over the whole matrices
    assert _entry_err(parts, whole) <= 4 * max(_entry_err(same, whole), torch.finfo(torch.float32).eps)


def test_non_contiguous_and_separate_kernels():
    _ext_or_skip()
    big = torch.randn(5, 80, 90)
    x = big[1:4, 3:70, 5:88]  # strided in every dim but the last
    g = kernel_pair_products(x, backend="ext")
    check(g, x, False, 0, "strided view")
    xt = big.transpose(1, 2)[:2]  # column stride != 1: copied, still right
    check(kernel_pair_products(xt, backend="ext"), xt, False, 0, "transposed view")


def test_nan_and_inf_are_not_hidden():
    _ext_or_skip()
    x = torch.randn(3, 50, 50)
    x[1, 10, 20] = float("nan")  # upper triangle: read in symmetric mode
    x[2, 5, 5] = float("inf")    # on the diagonal
    for backend in ("torch", "ext"):
        g = kernel_pair_products(x, symmetric=True, backend=backend)
        assert not torch.isfinite(g[1, 1]) and not torch.isfinite(g[2, 2]), backend
        assert torch.isfinite(g[0, 0]), backend


def test_lower_triangle_is_never_read():
    _ext_or_skip()
    x = torch.randn(2, 40, 40)
    x[0, 30, 3] = float("nan")  # strictly below the diagonal
    for backend in ("torch", "ext"):
        assert torch.isfinite(kernel_pair_products(x, symmetric=True, backend=backend)).all(), backend
        assert not torch.isfinite(kernel_pair_products(x, symmetric=False, backend=backend)).all(), backend


def test_ext_is_deterministic_and_thread_count_independent():
    _ext_or_skip()
    x = torch.randn(6, 700, 701)
    a = kernel_pair_products(x, symmetric=True, backend="ext")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = kernel_pair_products(x, symmetric=True, backend="ext")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    assert torch.equal(a, kernel_pair_products(x, symmetric=True, backend="ext"))


def test_bad_inputs_get_one_line_errors(monkeypatch):
    def one_line(exc_type, match, *args, **kwargs):
        with pytest.raises(exc_type, match=match) as info:
            kernel_pair_products(*args, **kwargs)
        assert "\n" not in str(info.value)

    one_line(ConfigError, r"shape \(T, R, N\)", torch.zeros(3, 3))
    one_line(ConfigError, "dtype must be one of", torch.zeros(1, 2, 2, dtype=torch.int32), backend="ext")
    one_line(ConfigError, "backend must be one of", torch.zeros(1, 2, 2), backend="cublas")
    # Triton on CPU tensors without the interpreter (which tests/conftest.py turns on where
    # there is no GPU): the one-line reason, on every machine.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    one_line(BackendUnavailableError, "CUDA device", torch.zeros(1, 2, 2), backend="triton")


def test_empty_tile_and_float64_auto():
    assert torch.equal(kernel_pair_products(torch.zeros(2, 0, 5)), torch.zeros(2, 2, dtype=torch.float64))
    x = torch.randn(2, 9, 9, dtype=torch.float64)
    assert torch.equal(kernel_pair_products(x), kernel_pairs_reference(x))  # auto keeps float64 on the reference


def test_ext_unavailable_is_explained(monkeypatch):
    monkeypatch.setattr(ops_ext, "_modules", {})
    monkeypatch.setattr(ops_ext, "_failures", {})
    monkeypatch.setenv("CXX", "no-such-compiler-entk")
    with pytest.raises(BackendUnavailableError, match="no C\\+\\+ compiler"):
        kernel_pair_products(torch.zeros(1, 2, 2), backend="ext")
    # auto falls back to a working backend instead of failing
    x = torch.randn(2, 5, 5)
    assert torch.equal(kernel_pair_products(x), kernel_pairs_reference(x))
    monkeypatch.setattr(ops_ext, "_failures", {})
    monkeypatch.setenv("ENTK_EXT", "0")
    assert not ops_ext.available("cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_reference(backend, symmetric, dtype):
    for size in [*SIZES, (16, 512, 515)]:
        x = _fresh(*size, dtype=dtype, device="cuda")
        for d in (0, 5):
            g = kernel_pair_products(x, symmetric=symmetric, diag_offset=d, backend=backend)
            assert g.device.type == "cuda"
            check(g, x, symmetric, d, f"{backend} cuda {size} {dtype} sym={symmetric} d={d}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_cuda_nan_lower_triangle_and_determinism(backend):
    x = torch.randn(5, 300, 300, device="cuda")
    x[0, 200, 3] = float("nan")  # below the diagonal: not read in symmetric mode
    a = kernel_pair_products(x, symmetric=True, backend=backend)
    assert torch.isfinite(a).all()
    assert torch.equal(a, kernel_pair_products(x, symmetric=True, backend=backend))
    x[3, 3, 200] = float("nan")
    assert not torch.isfinite(kernel_pair_products(x, symmetric=True, backend=backend)[3, 3])


def test_auto_falls_back_with_a_warning_when_a_fused_backend_breaks(monkeypatch):
    """A fused backend that fails at run time under ``auto`` warns and uses the reference;
    asked for explicitly, it raises."""
    import engine.ops.kernel_pairs as kp

    class Broken:
        def kernel_pairs(self, *a):
            raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(ops_ext, "available", lambda device="cpu": True)
    monkeypatch.setattr(ops_ext, "load", lambda device="cpu", **k: Broken())
    monkeypatch.setattr(kp, "triton_on_cuda", lambda device: False)
    x = torch.randn(3, 20, 20)
    with pytest.warns(UserWarning, match="falling back to the torch reference"):
        g = kernel_pair_products(x, symmetric=True)
    assert torch.equal(g, kernel_pairs_reference(x, symmetric=True))
    with pytest.raises(RuntimeError, match="simulated"):
        kernel_pair_products(x, backend="ext")


def _pairwise_float64(views, symmetric: bool, d: int) -> torch.Tensor:
    """G_ij from the separate matrices, one pair at a time (no stacking, no matmul)."""
    w = weights(views[0].shape[0], views[0].shape[1], d, dtype=torch.float64) if symmetric else 1.0
    t = len(views)
    g = torch.empty(t, t, dtype=torch.float64)
    for i in range(t):
        for j in range(t):
            g[i, j] = (w * views[i].double() * views[j].double()).sum()
    return g


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_sequence_of_separate_kernels_equals_the_stack(backend):
    """T separate (R, N) views (e.g. memory maps): every entry G_ij is the weighted inner product
    of views i and j (checked pair by pair in float64), and the result is exactly the stacked
    tile's (the CPU extension reads the separate matrices in place; the others stack them)."""
    if backend == "ext":
        _ext_or_skip()
    gen, seed = seeded()
    mats = [torch.randn(90, 121, generator=gen) for _ in range(4)]
    views = [m[5:70, 9:] for m in mats]  # row stride 121, unit column stride
    for sym in (False, True):
        a = kernel_pair_products(views, symmetric=sym, diag_offset=4, backend=backend)
        ref = _pairwise_float64(views, sym, 4)
        scale = torch.sqrt(torch.diagonal(ref)[:, None] * torch.diagonal(ref)[None, :])
        err = float(((a - ref) / scale).abs().max())
        tol = 4 * torch.finfo(torch.float64 if backend == "torch" else torch.float32).eps * views[0].numel() ** 0.5
        assert err <= tol, (backend, sym, err, seed)
        assert not torch.equal(a[0], a[1]), "distinct views must give distinct rows"
        b = kernel_pair_products(torch.stack(views), symmetric=sym, diag_offset=4, backend=backend)
        assert torch.equal(a, b), (backend, sym, seed)
    bf = [v.bfloat16() for v in views]
    stacked = kernel_pair_products(torch.stack(bf), backend=backend)
    assert torch.equal(kernel_pair_products(bf, backend=backend), stacked)
    with pytest.raises(ConfigError, match="share shape"):
        kernel_pair_products([views[0], views[1][:3]], backend=backend)
    with pytest.raises(ConfigError, match="sequence"):
        kernel_pair_products([], backend=backend)
