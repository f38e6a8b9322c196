"""Triton implementation of :func:`engine.ops.kernel_pairs.kernel_pair_products`.

G_ij = Σ_{r,c} w(r, c) x[i, r, c] x[j, r, c] for a tile ``x`` of T kernels, ``(T, R, N)``.

The op is memory-bound: every element is read once and feeds T multiply-adds. The (R, N)
plane is cut into *segments* of BLOCK_N columns of one row (of all T kernels at once);
a persistent grid of P programs streams them, program p taking segments p, p + P, … in
one flat loop, so the compiler can keep several segment loads in flight (num_stages) and
neighbouring programs read neighbouring memory at the same time. Per segment a
(TP, BLOCK_N) block is loaded (rows ≥ T masked, never read), its T × T products are
summed in float32 (≤ BLOCK_N terms, exact products for bfloat16) and added to a float64
per-program accumulator. Each program writes its float64 partial to a (P, TP, TP)
buffer, reduced on the host by one fixed-shape torch sum: deterministic, no atomics.

Symmetric mode enumerates only live work. Phase 1 walks the whole segments strictly above
the diagonal, in row-major order, and nothing else: the rows above the point where the
diagonal enters the tile ("head", every segment live), then the staircase of rows the
diagonal crosses, where row u (counted from the diagonal's entry) has n_full − 1 − ⌊u/BLOCK_N⌋
live segments. The flat index → (row, segment) map of the staircase inverts its quadratic
prefix count with one float64 square root and a ±1 integer correction (`_staircase_count`
is the same count in Python; the tests check the map against brute force). Phase 2 takes
per row the segment the diagonal crosses and the tail columns, with element masks. The
previous scheme iterated over every (row, segment) and masked the dead ones: on an H200
(bfloat16, T = 16, M = 8192) symmetric mode then took 0.71 ms for half the bytes that full
mode read in 0.80 ms — dead segments cost nearly as much as live ones. Phase 1 now has no
dead iterations at all; phase 2 has at most one per row.

Why float64 per segment rather than per larger tile: tensor cores accumulate in float32
with truncation, which biases long sums of squares; chaining 2048 bfloat16 products
through one tensor-core accumulator was 30 float32 ulps off on an H200. A fresh dot per
segment cannot be chained by accident either — Triton fuses ``acc += tl.dot(a, b)`` into
the dot's own accumulator, but not across the float64 conversion.

Two inner-product forms:

* ``tl.dot`` of the block with its transpose, T padded to TP ≥ 16 (the padded rows are
  masked and never read) — always for bfloat16, and for float32 when T > 8. float32 runs
  as tf32x3 by default (``FP32_DOT``): tensor-core products over the round-to-nearest tf32
  split x = hi + lo (hi·hi + hi·lo + lo·hi), whose error per product is a few float32 ulps
  (`engine.ops.tf32x3` derives the bound and emulates it). On a kernel block against itself
  hi·lo and lo·hi are transposes of each other, so two passes suffice (`_add_segment`,
  SPLIT2; sm_90 build: 128 mma instead of 192, 32 KiB of shared memory instead of 40-48);
  other block pairs use Triton's three-pass ``"tf32x3"``. ``"ieee"`` runs the dot as
  CUDA-core FMAs instead: float32-exact products, but at T = 16 that is 8 FLOP per byte
  read, and it measured 0.44 TB/s (10% of copy) on an H200.
* float32 with T ≤ 8: a broadcast product (TP, TP, BLOCK_N), TP = next power of two ≥ T,
  accumulated elementwise in float64 and reduced once at the end — TP² FMAs per column
  instead of the 256 a padded 16 × 16 dot would cost, and no per-segment reduction.

T > 64 is processed in 64-kernel blocks: one launch per block pair (I ≤ J), reading the
tile once per pair; the per-block results are exact sub-blocks of G.

Measured on an H200 (Triton 3.6, 2 GB tiles, N a multiple of 128; copy: 4.24 TB/s read +
write), full mode, bytes read per second: bfloat16 T = 16 / 32 / 64: 3.83 / 4.12 / 4.28
TB/s; bfloat16 T = 3: 0.70 (the padded 16-row tiles cost per-segment work regardless of
T); float32 ("ieee") T = 3 / 8 / 16: 1.6 / 1.0 / 0.45 (FMA-bound). An N that is not a
multiple of 16 makes the row starts misaligned and the loads scalar (bfloat16 T = 16: 2.1
TB/s); `engine.ntk.kernel_gram` therefore stages CUDA tiles with 16-element rows. The
live-only symmetric enumeration and the tf32x3 dot have not been timed on a GPU yet.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ..kernel_pairs import mirror

T_BLOCK = 64         # most kernels per pass
SMEM_BUDGET = 160 * 1024   # per SM, for the pipelined segment loads of the resident programs (H200: 228 KiB)
PROGRAM_SMEM = 128 * 1024  # per program
MAX_PROGRAMS_PER_SM = 8    # measured: 4 and 16 were no faster (bfloat16, T = 16)
CPU_PROGRAMS = 3     # the interpreter runs programs one by one; a few still exercise the striding
NARROW_LIMIT = 2**31 - 1  # index arithmetic is int32 while every intermediate stays below this
FP32_DOTS = ("tf32x3", "tf32x3-triton", "ieee")  # float32 dot forms (module docstring)
FP32_DOT = "tf32x3"  # the default: tensor cores at about float32's error
# Shared-memory tiles the tf32x3 split adds beside the pipelined loads, for the occupancy
# estimate (sm_90 builds, tests/test_triton_build.py: 0-2).
TF32X3_SMEM_TILES = 2


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
    float32 dot (tf32x3): by the sm_90 ptxas reports (tests/test_triton_build.py), the split
    operands make registers the limit. 4 warps and 128 columns hold TP = 16 at 168 registers;
    TP = 32 spilled at 128 columns (116-680 bytes), not at 64; TP = 64 spilled at 4 warps,
    not at 8 warps with 64 columns (172-212 registers), or 32 columns for two kernel blocks.
    """
    if not use_dot:
        return 1024 // tp, (8 if tp == 8 else 4), 4
    if elem_bytes == 4:
        return {16: (128, 4, 4), 32: (64, 4, 4)}.get(tp, (64 if buffers == 1 else 32, 8, 3))
    # Two kernel blocks (T > 64) at 256 columns spilled 636 bytes in the symmetric sm_90 build.
    block_n, stages = (256 if tp == 64 and buffers == 1 else 128), 4
    while stages * buffers * tp * block_n * elem_bytes > PROGRAM_SMEM:
        if stages > 2:
            stages -= 1
        else:
            block_n //= 2
    return block_n, 4, stages


def _staircase_count(u: int, n1: int, b: int) -> int:
    """Whole segments strictly above the diagonal in the staircase rows [0, u): row u' (its
    diagonal at column u') has n1 − ⌊u'/b⌋ of them, n1 = n_full − 1, b = BLOCK_N."""
    q, j = divmod(u, b)
    return b * (q * n1 - q * (q - 1) // 2) + j * (n1 - q)


def _plan(rows: int, n: int, diag_offset: int, block_n: int, symmetric: bool) -> dict:
    """The launch's work split (Python ints), shared by the launcher and the tests.

    head: rows [0, head) have every whole segment live (full mode: all rows). The staircase
    covers rows head + [0, u1 − u0) with diagonal offsets u ∈ [u0, u1); its whole segments
    are counted by F = `_staircase_count` and start at f0 = F(u0).
    """
    n_full = n // block_n
    if not symmetric:
        return dict(n_full=n_full, head=rows, u0=0, u1=0, f0=0, n_phase1=rows * n_full,
                    edge_per_row=int(n % block_n != 0))
    n1 = max(n_full - 1, 0)
    head = min(max(diag_offset, 0), rows)  # rows r < diag_offset lie wholly above the diagonal
    u0 = head - diag_offset                # ≥ 0 whenever a staircase row exists
    u1 = max(u0, min(rows - diag_offset, n1 * block_n))  # rows from n1·BLOCK_N on: no whole segment above
    f0 = _staircase_count(u0, n1, block_n) if u1 > u0 else 0
    stairs = _staircase_count(u1, n1, block_n) - f0 if u1 > u0 else 0
    return dict(n_full=n_full, head=head, u0=u0, u1=u1, f0=f0, n_phase1=head * n_full + stairs,
                edge_per_row=1 + int(n % block_n != 0))


def _phase1_segment_py(s: int, p: dict, diag_offset: int, block_n: int) -> tuple[int, int]:
    """(row, segment) of phase-1 segment s: the kernel's `_phase1_segment`, in Python ints."""
    n_full = p["n_full"]
    if s < p["head"] * n_full:
        return divmod(s, n_full)
    n1 = n_full - 1
    sp = s - p["head"] * n_full + p["f0"]
    c = 2 * n1 + 1
    q = int((c - math.sqrt(max(c * c - 8.0 * sp / block_n, 0.0))) / 2)
    if _staircase_count((q + 1) * block_n, n1, block_n) <= sp:
        q += 1
    if _staircase_count(q * block_n, n1, block_n) > sp:
        q -= 1
    rem = sp - _staircase_count(q * block_n, n1, block_n)
    j, k = divmod(rem, n1 - q)
    return q * block_n + j + diag_offset, q + 1 + k


@triton.jit
def _stairs_before(q, n1, BLOCK_N: tl.constexpr):
    """_staircase_count(q · BLOCK_N)."""
    return BLOCK_N * (q * n1 - q * (q - 1) // 2)


@triton.jit
def _phase1_segment(s, n_full, head, f0, diag_offset, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr,
                    WIDE: tl.constexpr):
    """(row, first column) of phase-1 segment s: see `_phase1_segment_py`. Index arithmetic is
    int32 unless WIDE (the launcher's bound on every intermediate): 64-bit integer division is
    several times dearer on a GPU, and it sits in front of every segment's loads."""
    r = s // n_full
    k = s % n_full
    if SYMMETRIC:
        n1 = n_full - 1
        sp = tl.maximum(s - head * n_full, 0) + f0
        c = (s * 0 + 2 * n1 + 1).to(tl.float64)  # n_full may arrive as a constexpr 1
        disc = tl.maximum(c * c - 8.0 * sp.to(tl.float64) / BLOCK_N, 0.0)
        if WIDE:
            q = ((c - tl.sqrt(disc)) * 0.5).to(tl.int64)
        else:
            q = ((c - tl.sqrt(disc)) * 0.5).to(tl.int32)
        q = tl.where(_stairs_before(q + 1, n1, BLOCK_N) <= sp, q + 1, q)
        q = tl.where(_stairs_before(q, n1, BLOCK_N) > sp, q - 1, q)
        rem = sp - _stairs_before(q, n1, BLOCK_N)
        width = tl.maximum(n1 - q, 1)
        stair = s >= head * n_full
        r = tl.where(stair, q * BLOCK_N + rem // width + diag_offset, r)
        k = tl.where(stair, q + 1 + rem % width, k)
    return r, k * BLOCK_N


@triton.jit
def _tf32_round(x):
    """float32 → nearest tf32 value, ties away from zero (PTX cvt.rna.tf32.f32), by integer ops
    that the CPU interpreter runs too; `engine.ops.tf32x3.tf32_round` is its reference."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@triton.jit
def _add_segment(acc, accm, a_ptrs, b_ptrs, a_mask, b_mask, r, cols, diag_offset, DOUBLE: tl.constexpr,
                 WEIGHTED: tl.constexpr, SAME: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, SPLIT2: tl.constexpr):
    """(acc, accm) + the (weighted, if WEIGHTED; doubled, if DOUBLE) products of one
    (TP, BLOCK_N) segment: (TP, TP) float64 for the dot form, (TP, TP, BLOCK_N) float64 for
    the broadcast form. Masked elements are never read.

    SPLIT2 (float32, one kernel block against itself): tf32x3 in two tensor-core passes
    instead of three. With x = hi + lo, G = hi·hiᵀ + hi·loᵀ + lo·hiᵀ, and the last term is
    the transpose of the middle one because both sides are the same kernels (per-element
    weights included: they scale hi exactly). acc collects hi·hiᵀ, accm collects hi·loᵀ, and
    the program adds accmᵀ once at the end. Same products as Triton's tf32x3, summed in
    float64 across segments, at two thirds of the tensor-core work.

    Whole segments above the diagonal apply their uniform weight 2 after the products, so
    the loaded tile goes straight into tl.dot. Multiplying the loaded tile by per-element
    weights first made symmetric mode 3× *slower* than full mode on an H200 (bfloat16,
    T = 16: 1.66 against 0.51 ms), presumably because the loads were no longer pipelined.
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
    if SPLIT2:
        hb = _tf32_round(xb)
        lb = xb - hb  # exact; the tf32 mma reads it truncated, as Triton's tf32x3 does
        if WEIGHTED:
            ha = _tf32_round(xa)
        else:
            ha = hb
        prod = tl.dot(ha, tl.trans(hb), input_precision="tf32").to(tl.float64)
        cross = tl.dot(ha, tl.trans(lb), input_precision="tf32").to(tl.float64)
        if DOUBLE:
            cross = cross * 2.0
        accm = accm + cross
    elif USE_DOT:
        prod = tl.dot(xa, tl.trans(xb), input_precision=PRECISION).to(tl.float64)
    else:
        prod = (xa[:, None, :] * xb[None, :, :]).to(tl.float64)
    if DOUBLE:
        prod = prod * 2.0
    return acc + prod, accm


@triton.jit
def _kernel_pairs_kernel(x_ptr, part_ptr, T, N, stride_t, stride_r, diag_offset, ti0, tj0, n_full,
                         head, f0, n_phase1, n_edge,
                         SYMMETRIC: tl.constexpr, TAIL: tl.constexpr, SAME: tl.constexpr, TP: tl.constexpr,
                         BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr, WIDE: tl.constexpr, SPLIT2: tl.constexpr):
    """One program's share of the segments.

    x_ptr: (T, R, N) with unit column stride; kernels ti0 + [0, TP) against tj0 + [0, TP)
    (SAME: the two blocks coincide, load once). part_ptr: (programs, TP, TP) float64.
    Phase 1 streams the ``n_phase1`` whole live segments (`_phase1_segment`) with masks
    constant along the row, so the loads stay vectorised; in symmetric mode they all lie
    strictly above the diagonal (uniform weight 2). Phase 2 takes the ``n_edge`` edge
    segments with per-element masks and weights: per row, in symmetric mode the whole
    segment holding the row's diagonal column, and the tail columns [n_full·BLOCK_N, N) if TAIL.
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
    accm = tl.zeros((TP, TP), dtype=tl.float64)  # SPLIT2's hi·loᵀ
    for seg in range(pid, n_phase1, step):
        s = pid * 0 + seg  # a tensor even where the interpreter hands out Python ints
        if WIDE:
            s = s.to(tl.int64)
        r, c0 = _phase1_segment(s, n_full, head, f0, diag_offset, SYMMETRIC, BLOCK_N, WIDE)
        cols = c0 + col
        off = (r.to(tl.int64) * stride_r + cols)[None, :]
        acc, accm = _add_segment(acc, accm, a_rows + off, b_rows + off, a_ok, b_ok, r, cols, diag_offset,
                                 SYMMETRIC, False, SAME, USE_DOT, UPCAST, PRECISION, SPLIT2)
    for e in range(pid, n_edge, step):
        if SYMMETRIC:
            if TAIL:
                r = e // 2
                crossing = e % 2 == 0
            else:
                r = e
                crossing = r >= 0
            diag = r - diag_offset  # the row's column on the diagonal
            c0 = tl.where(crossing, (tl.maximum(diag, 0) // BLOCK_N) * BLOCK_N, n_full * BLOCK_N)
            # The whole segment holding the diagonal column (one at or past n_full·BLOCK_N is
            # the tail segment's); rows wholly above the diagonal (diag < 0) have none.
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
        acc, accm = _add_segment(acc, accm, a_rows + off, b_rows + off, a_ok & m[None, :], b_ok & m[None, :], r,
                                 cols, diag_offset, False, SYMMETRIC, SAME, USE_DOT, UPCAST, PRECISION, SPLIT2)
    if SPLIT2:
        g = acc + accm + tl.trans(accm)
    elif USE_DOT:
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


def kernel_pairs_triton(x: torch.Tensor, *, symmetric: bool, diag_offset: int, fp32_dot: str = FP32_DOT
                        ) -> torch.Tensor:
    """``(T, R, N)`` float32/bfloat16 with ``x.stride(2) == 1`` → ``(T, T)`` float64, exactly symmetric.

    fp32_dot: the float32 dot form (module docstring): ``"tf32x3"`` (two tensor-core passes
    on diagonal kernel blocks, `_add_segment`), ``"tf32x3-triton"`` (Triton's three-pass
    tf32x3 throughout) or ``"ieee"`` (CUDA-core FMAs).
    """
    assert x.stride(2) == 1 and x.shape[1] >= 1 and x.shape[2] >= 1, "caller guarantees unit column stride, R, N ≥ 1"
    if fp32_dot not in FP32_DOTS:
        raise ValueError(f"fp32_dot must be one of {FP32_DOTS}, got {fp32_dot!r}")
    t, r, n = x.shape
    # The interpreter does bfloat16 arithmetic on the raw uint16 bits (wrong values), so there
    # bfloat16 is upcast to float32 first: exact, and the sums are float32 anyway.
    upcast = x.dtype == torch.bfloat16 and triton_interpreted()
    use_dot = x.dtype == torch.bfloat16 or t > 8
    # "tf32x3": two passes (SPLIT2) on diagonal kernel blocks, Triton's three elsewhere.
    split2 = use_dot and x.dtype == torch.float32 and fp32_dot == "tf32x3"
    precision = {"tf32x3-triton": "tf32x3"}.get(fp32_dot, fp32_dot) if x.dtype == torch.float32 else "ieee"
    tp = min(T_BLOCK, max(16 if use_dot else 1, triton.next_power_of_2(t)))
    buffers = 1 if t <= tp else 2  # a second kernel block is loaded when T > T_BLOCK
    extra = TF32X3_SMEM_TILES if use_dot and precision == "tf32x3" else 0
    block_n, num_warps, num_stages = _config(tp, use_dot, x.element_size(), buffers)
    if symmetric:
        r = max(0, min(r, n + int(diag_offset)))  # rows from n + diag_offset on lie wholly below the diagonal
    g = torch.zeros(t, t, dtype=torch.float64, device=x.device)
    if r == 0:
        return g
    p = _plan(r, n, int(diag_offset), block_n, bool(symmetric))
    n_edge = r * p["edge_per_row"]
    n1 = max(p["n_full"] - 1, 0)
    wide = max(p["n_phase1"] + n_edge + p["f0"] + p["head"] * p["n_full"], block_n * (n1 + 2) ** 2,
               n + block_n) > NARROW_LIMIT
    smem = (num_stages + extra) * buffers * tp * block_n * x.element_size() if use_dot else 0
    programs = _num_programs(p["n_phase1"] + n_edge, x.device, smem, num_warps)
    # Poisoned: a program that failed to write its partial turns G into NaN instead of garbage.
    part = torch.full((programs, tp, tp), float("nan"), dtype=torch.float64, device=x.device)
    for i0 in range(0, t, tp):
        for j0 in range(i0, t, tp):
            _kernel_pairs_kernel[(programs,)](
                x, part, t, n, x.stride(0), x.stride(1), int(diag_offset), i0, j0, p["n_full"],
                p["head"], p["f0"], p["n_phase1"], n_edge,
                SYMMETRIC=bool(symmetric), TAIL=n % block_n != 0, SAME=i0 == j0, TP=tp, BLOCK_N=block_n,
                USE_DOT=use_dot, UPCAST=upcast, PRECISION=precision, WIDE=wide,
                SPLIT2=split2 and i0 == j0, num_warps=num_warps, num_stages=num_stages)
            ni, nj = min(tp, t - i0), min(tp, t - j0)
            g[i0:i0 + ni, j0:j0 + nj] = part.sum(0)[:ni, :nj]
    return mirror(g)
