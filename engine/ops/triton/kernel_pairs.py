"""Triton implementation of :func:`engine.ops.kernel_pairs.kernel_pair_products`.

G_ij = Σ_{r,c} w(r, c) x[i, r, c] x[j, r, c] for a tile ``x`` of T kernels, ``(T, R, N)``.

The op is memory-bound: every element is read once and feeds T multiply-adds, so the
kernel is a persistent streaming loop. The (R, N) plane is cut into work tiles of
BLOCK_R rows × BLOCK_N columns (of all T kernels at once); program p handles tiles p,
p + P, p + 2P, … . Per row of a tile it loads a (TP, BLOCK_N) block (rows ≥ T and, in
symmetric mode, elements below the diagonal are masked, i.e. never read) and accumulates
the T × T products in float32; at the end of the tile the float32 sums are added to a
float64 per-program accumulator. So: float32 within a tile of BLOCK_R·BLOCK_N ≤ 4096
elements (exact products for bfloat16), float64 across tiles — the contract's precision.
Each program writes its float64 partial to a (P, TP, TP) buffer which the host reduces
with one fixed-shape torch sum (deterministic: no atomics, same order every call).

Two inner-product forms, chosen by TP (T padded to a power of two):

* TP ≥ 16: ``tl.dot`` of the weighted block with the block's transpose (tensor cores for
  bfloat16; float32 uses ``input_precision="ieee"`` so the result is float32-exact, not
  tf32).
* TP ≤ 8: ``tl.dot`` needs all dims ≥ 16, and padding T = 2 to 16 would waste 64× the
  multiply-adds — for float32 (CUDA-core FMAs) that turns a memory-bound op compute-bound.
  A broadcast product (TP, TP, BLOCK_N) reduced over columns does exactly TP² per column.

T > 64 is processed in 64-kernel blocks: one launch per block pair (I ≤ J), reading the
tile once per pair; the per-block results are exact sub-blocks of G.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ..kernel_pairs import _mirror

T_BLOCK = 64       # most kernels per pass: a (64, 64) float32 dot accumulator is 32 regs/thread at 4 warps
BLOCK_R = 16       # rows per tile: 16 × BLOCK_N ≤ 4096 elements summed in float32, then float64
PROGRAMS_PER_SM = 4  # persistent grid: enough resident programs per SM to keep loads in flight
CPU_PROGRAMS = 3   # the interpreter runs programs one by one; a few still exercise the striding


def _config(tp: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for H200, by the padded kernel count TP.

    A row load is TP·BLOCK_N elements; rows of 256 float32 (1 KiB) are full 128-byte
    transactions and keep per-iteration registers modest. The broadcast form holds a
    (TP, TP, BLOCK_N) product, so BLOCK_N shrinks as TP grows to stay ≤ 64 regs/thread.
    Larger TP gets 8 warps so the dot's accumulator and operands fit without spilling.
    num_stages=3 lets the compiler keep two row loads in flight ahead of the math.
    """
    if tp <= 4:
        return 256, 4, 3
    if tp == 8:
        return 128, 4, 3
    if tp == 16:
        return 256, 4, 3
    if tp == 32:
        return 128, 8, 3
    return 64, 8, 3


@triton.jit
def _kernel_pairs_kernel(x_ptr, part_ptr, T, R, N, stride_t, stride_r, diag_offset, ti0, tj0,
                         num_tiles, tiles_n,
                         SYMMETRIC: tl.constexpr, SAME: tl.constexpr, TP: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
                         UPCAST: tl.constexpr):
    """One program's share of the tiles.

    x_ptr: (T, R, N) with unit column stride; kernels ti0 + [0, TP) against tj0 + [0, TP)
    (SAME: the two blocks coincide, load once). part_ptr: (programs, TP, TP) float64.
    UPCAST: convert loads to float32 before any arithmetic (the interpreter's bfloat16).
    """
    pid = tl.program_id(0)
    t = tl.arange(0, TP)
    ta = ti0 + t
    tb = tj0 + t
    a_rows = x_ptr + ta.to(tl.int64)[:, None] * stride_t  # (TP, 1) kernel base pointers
    b_rows = x_ptr + tb.to(tl.int64)[:, None] * stride_t
    a_ok = (ta < T)[:, None]
    b_ok = (tb < T)[:, None]
    col = tl.arange(0, BLOCK_N)
    acc64 = tl.zeros((TP, TP), dtype=tl.float64)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        r0 = (tile // tiles_n) * BLOCK_R
        cols = (tile % tiles_n) * BLOCK_N + col
        # A tile whose last column is still below the first row's diagonal has all weights 0:
        # skip it without issuing a load.
        live = r0 >= 0
        if SYMMETRIC:
            live = tl.minimum((tile % tiles_n) * BLOCK_N + BLOCK_N, N) - 1 + diag_offset >= r0
        if live:
            acc = tl.zeros((TP, TP), dtype=tl.float32)
            for i in range(BLOCK_R):
                r = r0 + i
                m = (cols < N) & (r < R)
                if SYMMETRIC:
                    m = m & (cols + diag_offset >= r)
                off = (r.to(tl.int64) * stride_r + cols)[None, :]
                xa = tl.load(a_rows + off, mask=a_ok & m[None, :], other=0.0)
                if SAME:
                    xb = xa
                else:
                    xb = tl.load(b_rows + off, mask=b_ok & m[None, :], other=0.0)
                if UPCAST:
                    xa = xa.to(tl.float32)
                    xb = xb.to(tl.float32)
                if SYMMETRIC:
                    # ×2 is exact in any float format; unread elements are 0 already.
                    w = tl.where(cols + diag_offset > r, 2.0, 1.0).to(xa.dtype)
                    xa = xa * w[None, :]
                if USE_DOT:
                    acc = tl.dot(xa, tl.trans(xb), acc, input_precision="ieee")
                else:
                    xa32 = xa.to(tl.float32)
                    xb32 = xb.to(tl.float32)
                    acc += tl.sum(xa32[:, None, :] * xb32[None, :, :], axis=2)
            acc64 += acc.to(tl.float64)
    out = part_ptr + pid.to(tl.int64) * TP * TP + t[:, None] * TP + t[None, :]
    tl.store(out, acc64)


def _num_programs(num_tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_tiles, PROGRAMS_PER_SM * sms))
    return max(1, min(num_tiles, CPU_PROGRAMS))


def kernel_pairs_triton(x: torch.Tensor, *, symmetric: bool, diag_offset: int) -> torch.Tensor:
    """``(T, R, N)`` float32/bfloat16 with ``x.stride(2) == 1`` → ``(T, T)`` float64, exactly symmetric."""
    assert x.stride(2) == 1 and x.shape[1] >= 1 and x.shape[2] >= 1, "caller guarantees unit column stride, R, N ≥ 1"
    t, r, n = x.shape
    tp = min(T_BLOCK, max(1, triton.next_power_of_2(t)))
    tp = 16 if 8 < tp < 16 else tp
    block_n, num_warps, num_stages = _config(tp)
    block_r = min(BLOCK_R, r)  # R = 1 (one row per tile) should not loop over 15 masked rows
    tiles_n = triton.cdiv(n, block_n)
    num_tiles = triton.cdiv(r, block_r) * tiles_n
    programs = _num_programs(num_tiles, x.device)
    # The interpreter does bfloat16 arithmetic on the raw uint16 bits (wrong values), so there
    # bfloat16 is upcast to float32 first: exact, and the sums were float32 anyway.
    upcast = x.dtype == torch.bfloat16 and triton_interpreted()
    g = torch.zeros(t, t, dtype=torch.float64, device=x.device)
    part = torch.empty(programs, tp, tp, dtype=torch.float64, device=x.device)
    for i0 in range(0, t, tp):
        for j0 in range(i0, t, tp):
            _kernel_pairs_kernel[(programs,)](
                x, part, t, r, n, x.stride(0), x.stride(1), int(diag_offset), i0, j0, num_tiles, tiles_n,
                SYMMETRIC=bool(symmetric), SAME=i0 == j0, TP=tp, BLOCK_R=block_r, BLOCK_N=block_n,
                USE_DOT=tp >= 16, UPCAST=upcast, num_warps=num_warps, num_stages=num_stages)
            ni, nj = min(tp, t - i0), min(tp, t - j0)
            g[i0:i0 + ni, j0:j0 + nj] = part.sum(0)[:ni, :nj]
    return _mirror(g)
