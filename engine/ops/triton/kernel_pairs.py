"""Triton implementation of :func:`engine.ops.kernel_pairs.kernel_pair_products`.

G_ij = Σ_{r,c} w(r, c) x[i, r, c] x[j, r, c] for a tile ``x`` of T kernels, ``(T, R, N)``.

The op is memory-bound: every element is read once and feeds T multiply-adds. The (R, N)
plane is cut into *segments* of BLOCK_N columns of one row (of all T kernels at once);
a persistent grid of P programs streams them, program p taking segments p, p + P, … in
one flat loop, so the compiler can keep several segment loads in flight (num_stages) and
neighbouring programs read neighbouring memory at the same time. Per segment a
(TP, BLOCK_N) block is loaded — rows ≥ T and, in symmetric mode, elements below the
diagonal are masked, i.e. never read; a segment entirely below the diagonal costs no
memory traffic at all — and its T × T products are summed in float32 (≤ BLOCK_N terms,
exact products for bfloat16) and added to a float64 per-program accumulator. Each program
writes its float64 partial to a (P, TP, TP) buffer, reduced on the host by one fixed-shape
torch sum: deterministic, no atomics.

Why float64 per segment rather than per larger tile: tensor cores accumulate in float32
with truncation, which biases long sums of squares; chaining 2048 bfloat16 products
through one tensor-core accumulator was 30 float32 ulps off on an H200. A fresh dot per
segment cannot be chained by accident either — Triton fuses ``acc += tl.dot(a, b)`` into
the dot's own accumulator, but not across the float64 conversion.

Two inner-product forms:

* ``tl.dot`` of the block with its transpose, T padded to TP ≥ 16 —
  always for bfloat16 (tensor cores make the padding free; the padded rows are masked and
  never read), and for float32 when T > 8 (``input_precision="ieee"``: CUDA-core FMAs,
  float32-exact, not tf32; this is compute-bound at about T/2 FLOP per byte read).
* float32 with T ≤ 8: a broadcast product (TP, TP, BLOCK_N), TP = next power of two ≥ T,
  accumulated elementwise in float64 and reduced once at the end — TP² FMAs per column
  instead of the 256 a padded 16 × 16 dot would cost, and no per-segment reduction.

T > 64 is processed in 64-kernel blocks: one launch per block pair (I ≤ J), reading the
tile once per pair; the per-block results are exact sub-blocks of G.

Measured on an H200 (Triton 3.6, 2 GB tiles, N a multiple of 128; copy: 4.24 TB/s read +
write), full mode, bytes read per second: bfloat16 T = 16 / 32 / 64: 3.83 / 4.12 / 4.28
TB/s; bfloat16 T = 3: 0.70 (the padded 16-row tiles cost per-segment work regardless of
T); float32 T = 3 / 8 / 16: 1.6 / 1.0 / 0.45 (FMA-bound). An N that is not a multiple of
16 makes the row starts misaligned and the loads scalar (bfloat16 T = 16: 2.1 TB/s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ..kernel_pairs import _mirror

T_BLOCK = 64         # most kernels per pass
SMEM_BUDGET = 160 * 1024   # per SM, for the pipelined segment loads of the resident programs (H200: 228 KiB)
PROGRAM_SMEM = 128 * 1024  # per program
MAX_PROGRAMS_PER_SM = 8    # measured: 4 and 16 were no faster (bfloat16, T = 16)
CPU_PROGRAMS = 3     # the interpreter runs programs one by one; a few still exercise the striding


def _config(tp: int, use_dot: bool, elem_bytes: int, buffers: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for H200.

    Dot form: the pipelined loads take num_stages · buffers (TP, BLOCK_N) tiles of shared
    memory; 4 stages keep three segment loads in flight per program. BLOCK_N = 128 keeps
    a float32 sum at 128 terms (8 truncating tensor-core steps for bfloat16); at T = 64 a
    256-column segment measured 4.28 TB/s (bfloat16) against 3.29 for 128. Stages, then
    columns, are cut until the tiles fit PROGRAM_SMEM (T = 64 float32: 4 × 64 KiB would
    exceed the 227 KiB an H200 program may have).
    Broadcast form: the (TP, TP, BLOCK_N) float64 accumulator holds 1024·TP elements
    (≤ 32 float64 registers/thread), so BLOCK_N shrinks as TP grows.
    """
    if not use_dot:
        return 1024 // tp, (8 if tp == 8 else 4), 4
    block_n, stages = (256 if tp == 64 else 128), 4
    while stages * buffers * tp * block_n * elem_bytes > PROGRAM_SMEM:
        if stages > 2:
            stages -= 1
        else:
            block_n //= 2
    return block_n, 4, stages


@triton.jit
def _add_segment(acc, a_ptrs, b_ptrs, a_mask, b_mask, r, cols, diag_offset, DOUBLE: tl.constexpr,
                 WEIGHTED: tl.constexpr, SAME: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + the (weighted, if WEIGHTED; doubled, if DOUBLE) products of one (TP, BLOCK_N)
    segment: (TP, TP) float64 for the dot form, (TP, TP, BLOCK_N) float64 for the broadcast
    form. Masked elements are never read.

    Whole segments above the diagonal apply their uniform weight 2 after the products, so
    the loaded tile goes straight into tl.dot. Multiplying the loaded tile by per-element
    weights first made symmetric mode 3× *slower* than full mode on an H200 (bfloat16,
    T = 16: 1.66 against 0.51 ms), presumably because the loads were no longer pipelined;
    this form is checked in the interpreter but was not re-measured on a GPU.
    """
    xa = tl.load(a_ptrs, mask=a_mask, other=0.0)
    if SAME:
        xb = xa
    else:
        xb = tl.load(b_ptrs, mask=b_mask, other=0.0)
    if UPCAST:
        xa = xa.to(tl.float32)
        xb = xb.to(tl.float32)
    if WEIGHTED:
        # ×2 is exact in any float format; unread elements are 0 already.
        w = tl.where(cols + diag_offset > r, 2.0, 1.0).to(xa.dtype)
        xa = xa * w[None, :]
    if USE_DOT:
        prod = tl.dot(xa, tl.trans(xb), input_precision="ieee").to(tl.float64)
    else:
        prod = (xa[:, None, :] * xb[None, :, :]).to(tl.float64)
    if DOUBLE:
        prod = prod * 2.0
    return acc + prod


@triton.jit
def _kernel_pairs_kernel(x_ptr, part_ptr, T, N, stride_t, stride_r, diag_offset, ti0, tj0, rows, n_full, n_edge,
                         SYMMETRIC: tl.constexpr, SAME: tl.constexpr, TP: tl.constexpr, BLOCK_N: tl.constexpr,
                         USE_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """One program's share of the segments.

    x_ptr: (T, R, N) with unit column stride; kernels ti0 + [0, TP) against tj0 + [0, TP)
    (SAME: the two blocks coincide, load once). part_ptr: (programs, TP, TP) float64.
    Phase 1 streams the ``rows · n_full`` whole segments (columns [k·BLOCK_N, (k+1)·BLOCK_N),
    k < n_full = N // BLOCK_N) with masks constant along the row, so the loads stay
    vectorised; in symmetric mode only segments strictly above the diagonal are read
    (uniform weight 2). Phase 2 takes the ``n_edge`` edge segments with per-element masks
    and weights: per row the tail columns [n_full·BLOCK_N, N) and, in symmetric mode, the
    whole segment holding the row's diagonal column.
    UPCAST: convert loads to float32 before any arithmetic (the interpreter's bfloat16).
    """
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    t = tl.arange(0, TP)
    ta = ti0 + t
    tb = tj0 + t
    a_rows = x_ptr + ta.to(tl.int64)[:, None] * stride_t  # (TP, 1) kernel base pointers
    b_rows = x_ptr + tb.to(tl.int64)[:, None] * stride_t
    a_ok = (ta < T)[:, None]
    b_ok = (tb < T)[:, None]
    col = tl.arange(0, BLOCK_N)
    if USE_DOT:
        acc = tl.zeros((TP, TP), dtype=tl.float64)
    else:
        acc = tl.zeros((TP, TP, BLOCK_N), dtype=tl.float64)
    for seg in range(pid, rows * n_full, step):
        r = seg // n_full
        c0 = (seg % n_full) * BLOCK_N
        cols = c0 + col
        live = r >= 0
        if SYMMETRIC:
            live = c0 + diag_offset > r  # the whole segment lies strictly above the diagonal: weight 2
        off = (r.to(tl.int64) * stride_r + cols)[None, :]
        acc = _add_segment(acc, a_rows + off, b_rows + off, a_ok & live, b_ok & live, r, cols, diag_offset,
                           SYMMETRIC, False, SAME, USE_DOT, UPCAST)
    for e in range(pid, n_edge, step):
        if SYMMETRIC:
            r = e // 2
            diag = r - diag_offset  # the row's column on the diagonal
            crossing = e % 2 == 0
            c0 = tl.where(crossing, (tl.maximum(diag, 0) // BLOCK_N) * BLOCK_N, n_full * BLOCK_N)
            # The whole segment holding the diagonal column (one at or past n_full·BLOCK_N is
            # the tail segment, taken by the other kind).
            valid = tl.where(crossing, (diag >= 0) & (diag < n_full * BLOCK_N), True)
        else:
            r = e
            c0 = n_full * BLOCK_N
            valid = r >= 0
        cols = c0 + col
        m = (cols < N) & valid
        if SYMMETRIC:
            m = m & (cols + diag_offset >= r)
        off = (r.to(tl.int64) * stride_r + cols)[None, :]
        acc = _add_segment(acc, a_rows + off, b_rows + off, a_ok & m[None, :], b_ok & m[None, :], r, cols,
                           diag_offset, False, SYMMETRIC, SAME, USE_DOT, UPCAST)
    if USE_DOT:
        g = acc
    else:
        g = tl.sum(acc, axis=2)
    out = part_ptr + pid.to(tl.int64) * TP * TP + t[:, None] * TP + t[None, :]
    tl.store(out, g)


def _num_programs(num_segments: int, device: torch.device, smem_per_program: int, num_warps: int) -> int:
    """A persistent grid no larger than what can be resident at once (a second wave would
    leave most SMs idle while it runs)."""
    if device.type != "cuda":
        return max(1, min(num_segments, CPU_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_sm = max(1, min(MAX_PROGRAMS_PER_SM, SMEM_BUDGET // max(1, smem_per_program), 64 // num_warps))
    return max(1, min(num_segments, per_sm * sms))


def kernel_pairs_triton(x: torch.Tensor, *, symmetric: bool, diag_offset: int) -> torch.Tensor:
    """``(T, R, N)`` float32/bfloat16 with ``x.stride(2) == 1`` → ``(T, T)`` float64, exactly symmetric."""
    assert x.stride(2) == 1 and x.shape[1] >= 1 and x.shape[2] >= 1, "caller guarantees unit column stride, R, N ≥ 1"
    t, r, n = x.shape
    # The interpreter does bfloat16 arithmetic on the raw uint16 bits (wrong values), so there
    # bfloat16 is upcast to float32 first: exact, and the sums are float32 anyway.
    upcast = x.dtype == torch.bfloat16 and triton_interpreted()
    use_dot = x.dtype == torch.bfloat16 or t > 8
    tp = min(T_BLOCK, max(16 if use_dot else 1, triton.next_power_of_2(t)))
    buffers = 1 if t <= tp else 2  # a second kernel block is loaded when T > T_BLOCK
    block_n, num_warps, num_stages = _config(tp, use_dot, x.element_size(), buffers)
    if symmetric:
        r = max(0, min(r, n + int(diag_offset)))  # rows from n + diag_offset on lie wholly below the diagonal
    g = torch.zeros(t, t, dtype=torch.float64, device=x.device)
    if r == 0:
        return g
    n_full = n // block_n
    tail = n % block_n != 0
    n_edge = 2 * r if symmetric else (r if tail else 0)
    smem = num_stages * buffers * tp * block_n * x.element_size() if use_dot else 0
    programs = _num_programs(r * n_full + n_edge, x.device, smem, num_warps)
    # Poisoned: a program that failed to write its partial turns G into NaN instead of garbage.
    part = torch.full((programs, tp, tp), float("nan"), dtype=torch.float64, device=x.device)
    for i0 in range(0, t, tp):
        for j0 in range(i0, t, tp):
            _kernel_pairs_kernel[(programs,)](
                x, part, t, n, x.stride(0), x.stride(1), int(diag_offset), i0, j0, r, n_full, n_edge,
                SYMMETRIC=bool(symmetric), SAME=i0 == j0, TP=tp, BLOCK_N=block_n, USE_DOT=use_dot, UPCAST=upcast,
                num_warps=num_warps, num_stages=num_stages)
            ni, nj = min(tp, t - i0), min(tp, t - j0)
            g[i0:i0 + ni, j0:j0 + nj] = part.sum(0)[:ni, :nj]
    return _mirror(g)
