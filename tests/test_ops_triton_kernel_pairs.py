"""kernel_pair_products(backend="triton") against the float64 reference on fresh random inputs.

On a machine without CUDA the kernel runs in the Triton interpreter (tests/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.ops.backend import triton_unavailable_reason
from engine.ops.kernel_pairs import kernel_pair_products, kernel_pairs_reference, weights
from tests._tolerance import assert_close_to_torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# (symmetric, diag_offset): full weights, the diagonal through (0, 0), above it, below it.
MODES = [(False, 0), (True, 0), (True, 5), (True, -4)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if why := triton_unavailable_reason(torch.device(request.param)):
        pytest.skip(why)
    return request.param


def _seeded() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def _torch_same_precision(x: torch.Tensor, symmetric: bool, diag_offset: int) -> torch.Tensor:
    """Plain torch in float32 (bfloat16 upcast: its products are exact in float32, as in the kernel)."""
    t = x.shape[0]
    x32 = x.float()
    xw = x32 * weights(x.shape[1], x.shape[2], diag_offset, device=x.device, dtype=torch.float32) if symmetric else x32
    return xw.reshape(t, -1) @ x32.reshape(t, -1).T


def _check(x: torch.Tensor, symmetric: bool, diag_offset: int, what: str) -> torch.Tensor:
    g = kernel_pair_products(x, symmetric=symmetric, diag_offset=diag_offset, backend="triton")
    assert g.dtype == torch.float64 and g.shape == (x.shape[0],) * 2 and g.device == x.device, what
    assert torch.equal(g, g.T), f"{what}: not exactly symmetric"
    ref = kernel_pairs_reference(x, symmetric=symmetric, diag_offset=diag_offset)
    assert_close_to_torch(g.cpu(), _torch_same_precision(x, symmetric, diag_offset).cpu(), ref.cpu(), what=what)
    return g


@pytest.mark.parametrize("t", [1, 2, 3, 17])
@pytest.mark.parametrize("rn", [(1, 7), (7, 33), (33, 123), (123, 7)], ids=lambda rn: "{}x{}".format(*rn))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"sym{m[1]:+d}" if m[0] else "full")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_matches_float64_reference(device, t, rn, mode, dtype):
    gen, seed = _seeded()
    x = torch.randn(t, *rn, generator=gen).to(dtype).to(device)
    _check(x, *mode, what=f"T={t} R,N={rn} mode={mode} {dtype} seed={seed}")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"sym{m[1]:+d}" if m[0] else "full")
def test_non_contiguous_views(device, mode):
    gen, seed = _seeded()
    t, r, n = 5, 37, 45
    # A tile cut out of bigger kernels (row stride ≠ N) …
    big = torch.randn(t + 2, r + 9, n + 20, generator=gen).to(device)
    _check(big[1:1 + t, 4:4 + r, 11:11 + n], *mode, what=f"slice mode={mode} seed={seed}")
    # … kernels interleaved row by row (kernel stride N, row stride T·N) …
    _check(torch.randn(r, t, n, generator=gen).to(device).transpose(0, 1), *mode, what=f"interleaved seed={seed}")
    # … and columns with stride 2 (kernel_pair_products copies those first).
    _check(big[:t, :r, : 2 * (n // 2) : 2], *mode, what=f"column stride 2 seed={seed}")


@pytest.mark.parametrize("t", [17, 40])
def test_kernel_blocks_beyond_one_pass(device, t, monkeypatch):
    """T above the per-pass block (64 normally; 16 here to stay cheap) goes block pair by block pair."""
    import engine.ops.triton.kernel_pairs as kp

    monkeypatch.setattr(kp, "T_BLOCK", 16)
    gen, seed = _seeded()
    x = torch.randn(t, 9, 21, generator=gen).to(device)
    for mode in MODES[:2]:
        _check(x, *mode, what=f"T={t} blocks of 16 mode={mode} seed={seed}")


def test_seventy_kernels(device):
    gen, seed = _seeded()
    _check(torch.randn(70, 5, 19, generator=gen).to(device), True, 2, what=f"T=70 seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_nan_on_or_above_diagonal_propagates(device, dtype):
    gen, _ = _seeded()
    for symmetric, (r, c) in ((False, (20, 3)), (True, (6, 6)), (True, (2, 30))):
        x = torch.randn(3, 33, 45, generator=gen).to(dtype)
        x[1, r, c] = float("nan")
        g = kernel_pair_products(x.to(device), symmetric=symmetric, diag_offset=0, backend="triton")
        assert not torch.isfinite(g[1, 1]), f"NaN at {(r, c)} symmetric={symmetric} was lost"
        assert torch.isfinite(g[0, 2]), "NaN leaked into pairs that never read it"


@pytest.mark.parametrize("diag_offset", [0, 3, -5])
def test_elements_below_diagonal_are_not_read(device, diag_offset):
    """A NaN strictly below the diagonal has weight 0; G stays finite only if it is never loaded."""
    gen, seed = _seeded()
    x = torch.randn(3, 40, 130, generator=gen)
    for r, c in ((39, 0), (20, 20 - diag_offset - 1), (1, 1 - diag_offset - 1)):
        if 0 <= c < x.shape[2]:
            x[:, r, c] = float("nan")
    x = x.to(device)
    g = kernel_pair_products(x, symmetric=True, diag_offset=diag_offset, backend="triton")
    assert torch.isfinite(g).all(), f"a below-diagonal element was read (seed={seed})"
    ref = kernel_pairs_reference(torch.nan_to_num(x, nan=0.0), symmetric=True, diag_offset=diag_offset)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_deterministic(device, dtype):
    gen, _ = _seeded()
    x = torch.randn(17, 45, 70, generator=gen).to(dtype).to(device)
    for symmetric in (False, True):
        g1 = kernel_pair_products(x, symmetric=symmetric, diag_offset=-3, backend="triton")
        g2 = kernel_pair_products(x, symmetric=symmetric, diag_offset=-3, backend="triton")
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_whole_and_edge_segments(device, dtype, monkeypatch):
    """16-column segments on wide tiles: whole segments on, above and below the diagonal, the
    segment the diagonal crosses (also when it starts exactly on it) and the tail segment."""
    import engine.ops.triton.kernel_pairs as kp

    monkeypatch.setattr(kp, "_config", lambda *args: (16, 4, 2))
    gen, seed = _seeded()
    for t, (r, n) in ((2, (21, 37)), (9, (13, 100)), (3, (20, 16))):
        x = torch.randn(t, r, n, generator=gen).to(dtype).to(device)
        for mode in ((False, 0), (True, 0), (True, 3), (True, 16), (True, -16), (True, -21)):
            _check(x, *mode, what=f"T={t} R,N={(r, n)} mode={mode} {dtype} seed={seed}")
