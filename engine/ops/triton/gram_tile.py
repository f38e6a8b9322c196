"""Triton implementation of :func:`engine.ops.gram_tile.gram_tile` (contract in its module docstring).

Rows are ordered n·C + c. One program owns a (BLOCK_N × BLOCK_M) tile of *sample*
indices (n, m) and loops over output channels:

* ``want="full"``: C plays no role, so the launch uses C = 1 — a plain tiled matmul
  a @ bᵀ over rows, with contiguous stores (the common case).
* ``want="traced"``: one float32 accumulator collects A_c @ B_cᵀ over every c and every
  K-chunk (A_c = rows n·C + c), stored once.
* ``want="both"``: for every channel pair (c, c2) the sub-tile A_c @ B_c2ᵀ is written to
  full rows n·C + c, columns m·C + c2; when c == c2 it is also added to a register
  accumulator for the traced tile, stored once at the end. Each output element is written
  by exactly one program, so there are no atomics and the result is deterministic.

With ``upper`` only elements with global column ≥ global row are stored (masked), and
program tiles entirely below the diagonal are skipped; nothing below the diagonal is
ever loaded or stored. ``accumulate`` loads the existing value under the same mask.

float32 inputs use ``input_precision="ieee"`` (torch.mm's default float32 precision, not
tf32); bfloat16 inputs go to the tensor cores with float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted

GROUP_N = 8  # L2 swizzle: consecutive programs share a band of 8 a-row tiles


def _config(dtype: torch.dtype, two_accumulators: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages) for H200.

    bfloat16, one accumulator: 128×128×64, 8 warps, 3 stages — the usual Hopper bf16
    tensor-core shape (64 fp32 accumulator regs/thread, 3 × 32 KiB of shared memory).
    float32 "ieee" runs on CUDA-core FMAs whose operands are read from shared memory per
    k-step: 64×64×32 with 4 warps keeps 32 accumulator regs/thread and leaves room for 3
    stages. ``want="both"`` carries a second (traced) accumulator next to the sub-tile's,
    so its tiles are halved in one dimension to stay clear of register spills.
    """
    if dtype == torch.bfloat16:
        return (128, 64, 64, 8, 3) if two_accumulators else (128, 128, 64, 8, 3)
    return (64, 32, 32, 4, 3) if two_accumulators else (64, 64, 32, 4, 3)


@triton.jit
def _dot_rows(a_ptr, b_ptr, a_rows, b_rows, a_ok, b_ok, P, sa0, sa1, sb0, sb1, acc,
              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a[a_rows] @ b[b_rows]ᵀ over all P columns. a_rows (BN,), b_rows (BM,) int64."""
    k = tl.arange(0, BLOCK_K)
    for k0 in range(0, P, BLOCK_K):
        kk = k0 + k
        k_ok = kk < P
        x = tl.load(a_ptr + a_rows[:, None] * sa0 + kk[None, :] * sa1, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(b_ptr + b_rows[:, None] * sb0 + kk[None, :] * sb1, mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
    return acc


@triton.jit
def _store_tile(ptr, rows, cols, s0, s1, val, mask, ACCUMULATE: tl.constexpr):
    """ptr[rows, cols] (+)= val under mask; masked elements are neither read nor written."""
    ptrs = ptr + rows[:, None] * s0 + cols[None, :] * s1
    if ACCUMULATE:
        val += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, val, mask=mask)


@triton.jit
def _gram_tile_kernel(a_ptr, b_ptr, out_ptr, tr_ptr, Na, Nb, P, C,
                      sa0, sa1, sb0, sb1, so0, so1, st0, st1,
                      WANT_FULL: tl.constexpr, WANT_TRACED: tl.constexpr, ACCUMULATE: tl.constexpr,
                      UPPER: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """a: (Na·C, P), b: (Nb·C, P); out: (Na·C, Nb·C) float32; traced: (Na, Nb) float32.

    1-D grid of cdiv(Na, BLOCK_N) · cdiv(Nb, BLOCK_M) programs in grouped order.
    """
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(Na, BLOCK_N)
    tiles_m = tl.cdiv(Nb, BLOCK_M)
    group = GROUP * tiles_m
    first = (pid // group) * GROUP
    size = tl.minimum(tiles_n - first, GROUP)
    pid_n = first + (pid % group) % size
    pid_m = (pid % group) // size
    # upper: a tile whose last sample column precedes its first sample row is all below the
    # diagonal, in the traced kernel and (as m·C + c2 < n·C + c there) in the full one.
    live = pid_m >= 0
    if UPPER:
        live = pid_m * BLOCK_M + BLOCK_M - 1 >= pid_n * BLOCK_N
    if live:
        n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        n_ok = n < Na
        m_ok = m < Nb
        nm_ok = n_ok[:, None] & m_ok[None, :]
        tr = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if WANT_FULL:
            for c in range(0, C):
                for c2 in range(0, C):
                    sub = _dot_rows(a_ptr, b_ptr, n * C + c, m * C + c2, n_ok, m_ok, P, sa0, sa1, sb0, sb1,
                                    tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), BLOCK_K, UPCAST)
                    rows = n * C + c
                    cols = m * C + c2
                    mask = nm_ok
                    if UPPER:
                        mask = mask & (cols[None, :] >= rows[:, None])
                    _store_tile(out_ptr, rows, cols, so0, so1, sub, mask, ACCUMULATE)
                    if WANT_TRACED:
                        if c == c2:
                            tr += sub
        else:
            for c in range(0, C):
                tr = _dot_rows(a_ptr, b_ptr, n * C + c, m * C + c, n_ok, m_ok, P, sa0, sa1, sb0, sb1, tr,
                               BLOCK_K, UPCAST)
        if WANT_TRACED:
            mask = nm_ok
            if UPPER:
                mask = mask & (m[None, :] >= n[:, None])
            _store_tile(tr_ptr, n, m, st0, st1, tr, mask, ACCUMULATE)


def gram_tile_triton(a: torch.Tensor, b: torch.Tensor, *, want: str, num_outputs: int,
                     out: torch.Tensor | None, traced: torch.Tensor | None, accumulate: bool, upper: bool):
    """Validated inputs (see :func:`engine.ops.gram_tile.gram_tile`) → ``(full | None, traced | None)``."""
    c = int(num_outputs)
    ra, rb, p = a.shape[0], b.shape[0], a.shape[1]
    want_full, want_traced = want in ("full", "both"), want in ("traced", "both")
    if want_full and out is None:
        out = torch.zeros(ra, rb, dtype=torch.float32, device=a.device)
    if want_traced and traced is None:
        traced = torch.zeros(ra // c, rb // c, dtype=torch.float32, device=a.device)
    full_out = out if want_full else None
    traced_out = traced if want_traced else None
    if ra == 0 or rb == 0:
        return full_out, traced_out
    # Without the traced kernel the channel structure is irrelevant: rows are samples (C = 1).
    launch_c = c if want_traced else 1
    na, nb = ra // launch_c, rb // launch_c
    block_n, block_m, block_k, num_warps, num_stages = _config(a.dtype, want_full and want_traced and c > 1)
    # The interpreter does bfloat16 arithmetic on the raw uint16 bits; upcasting first is
    # exact and the accumulation is float32 either way.
    upcast = a.dtype == torch.bfloat16 and triton_interpreted()
    dummy = full_out if full_out is not None else traced_out  # never dereferenced: constexpr-disabled
    o = full_out if full_out is not None else dummy
    t = traced_out if traced_out is not None else dummy
    grid = (triton.cdiv(na, block_n) * triton.cdiv(nb, block_m),)
    _gram_tile_kernel[grid](
        a, b, o, t, na, nb, p, launch_c,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), o.stride(0), o.stride(1), t.stride(0), t.stride(1),
        WANT_FULL=want_full, WANT_TRACED=want_traced, ACCUMULATE=bool(accumulate), UPPER=bool(upper),
        UPCAST=upcast, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, GROUP=GROUP_N,
        num_warps=num_warps, num_stages=num_stages)
    return full_out, traced_out
