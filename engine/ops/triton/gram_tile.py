"""Triton implementation of :func:`engine.ops.gram_tile.gram_tile` (contract in its module docstring).

Rows are ordered n·C + c. One kernel computes out[n, m] (+)= Σ_c A_c[n] · B_c[m], with
A_c = rows n·C + c of a; each program owns a (BLOCK_N × BLOCK_M) output tile, loops over
the channels c and, per channel, over P in BLOCK_K chunks, and stores its tile once. Each
output element is written by exactly one program: no atomics, deterministic.

* ``want="full"``: one launch with C = 1 — a plain tiled matmul a @ bᵀ over rows.
* ``want="traced"``: one launch with the real C (1/C of the full kernel's FLOPs).
* ``want="both"``: the two launches. The single pass that loops over channel pairs (c, c2)
  writing sub-tiles to full and adding the c == c2 ones to a traced accumulator was
  measured 4.8-6.6× slower on an H200 (bf16, C = 10: 5.9 ms against 1.24 ms for 5120² ×
  8192; 22.5 against 3.4 ms for 20480² × 2048): it has C² times fewer, and longer,
  programs, and channel-strided stores; reading a and b a second time costs far less.

With ``upper`` only elements with column ≥ row are stored (masked), and program tiles
entirely below the diagonal are skipped; nothing below the diagonal is ever loaded or
stored. ``accumulate`` loads the existing value under the same mask.

float32 inputs use ``input_precision="tf32x3"`` by default (``FP32_DOT``): three tf32
tensor-core passes over the split x = hi + lo (hi·hi + hi·lo + lo·hi), error per product a
few float32 ulps (derived and emulated in :mod:`engine.ops.tf32x3`); ``"ieee"`` (torch.mm's
default float32 precision) runs on CUDA-core FMAs and measured 41% of cuBLAS's sgemm on an
H200. bfloat16 inputs go to the tensor cores with float32 accumulation. Tensor cores
accumulate with truncation, so for long P a bfloat16 tile is less exact than torch's
float32 matmul of the upcast inputs (H200, 8192² × 8192: 9.1e-6 against 9.6e-7 relative;
cuBLAS's bfloat16 GEMM shares this and then rounds its output to bfloat16)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted

GROUP_N = 8  # L2 swizzle: consecutive programs share a band of 8 a-row tiles
FP32_DOT = "tf32x3"  # float32 dot form: "tf32x3" (tensor cores, ~float32 error) or "ieee" (CUDA-core FMAs)


def _config(dtype: torch.dtype, na: int, nb: int, device: torch.device, precision: str = "ieee",
            single: bool = True):
    """(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages) for H200: the largest tile that
    still gives every SM a program (a 512 × 512 traced kernel is only 16 tiles of 128²).

    bfloat16: 128×256×64 at 8 warps and 3 stages (3 × 48 KiB of shared memory) measured
    640-670 TFLOP/s against 610 for 128×128 on 8192² × 8192 (cuBLAS: 760); smaller tiles
    only to fill the SMs. float32 "ieee" runs on CUDA-core FMAs: 128×64×32 at 4 warps
    measured 21 TFLOP/s against 14 for 64×64 (cuBLAS sgemm: 51). A row stride that is not
    a multiple of 16 elements (odd P, contiguous) makes every load scalar: bfloat16
    8192² × 8191 ran at 47 TFLOP/s (cuBLAS: 136) — pad P if that matters.
    float32 "tf32x3" runs three tf32 tensor-core passes (H200 dense tf32: ~495 TFLOP/s, so
    ~165 for the three, against ~67 for float32 FMAs): it gets the bfloat16 kernel's large
    tiles at half the K depth, as its operands and their hi/lo split are 4 bytes wide
    (sm_90 AOT build: shared memory in tests/test_triton_build.py). Not yet timed.
    The traced kernel (C > 1) keeps a channel accumulator beside each dot's own: by the sm_90
    ptxas reports every tile larger than 64 × 64 spilled in its main loop (bfloat16
    128 × 128 × 64: 28-56 bytes; float32 tf32x3 128 × 128 × 32: 260-356; 128 × 256, as the
    full kernel's first choice: 3 KB), 64 × 64 did not (183-225 registers). It costs 1/C of
    the full kernel's FLOPs, so it takes 64 × 64 tiles.
    """
    if not single:
        cands = [(64, 64, 64, 4, 3) if dtype == torch.bfloat16 else (64, 64, 32, 4, 3)]
    elif dtype == torch.bfloat16:
        cands = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3)]
    elif precision == "tf32x3":
        cands = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (32, 32, 32, 4, 3)]
    else:
        cands = [(128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (32, 32, 32, 4, 3)]
    if device.type != "cuda":
        return cands[0]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for cfg in cands:
        if triton.cdiv(na, cfg[0]) * triton.cdiv(nb, cfg[1]) >= sms:
            return cfg
    return cands[-1]


@triton.jit
def _dot_rows(a_ptr, b_ptr, a_rows, b_rows, a_ok, b_ok, P, sa0, sa1, sb0, sb1,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    """a[a_rows] @ b[b_rows]ᵀ over all P columns, float32. a_rows (BN,), b_rows (BM,) int64.

    Whole K-blocks first with row-only masks (constant along K, so the loads stay
    vectorised whatever P is), then one masked tail block.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None] * sa0
    b_base = b_ptr + b_rows[:, None] * sb0
    p_main = P - P % BLOCK_K
    for k0 in range(0, p_main, BLOCK_K):
        kk = k0 + k
        x = tl.load(a_base + kk[None, :] * sa1, mask=a_ok[:, None], other=0.0)
        y = tl.load(b_base + kk[None, :] * sb1, mask=b_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    if p_main < P:
        kk = p_main + k
        k_ok = kk < P
        x = tl.load(a_base + kk[None, :] * sa1, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(b_base + kk[None, :] * sb1, mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gram_tile_kernel(a_ptr, b_ptr, out_ptr, Na, Nb, P, C, sa0, sa1, sb0, sb1, so0, so1,
                      ACCUMULATE: tl.constexpr, UPPER: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                      PRECISION: tl.constexpr, SINGLE: tl.constexpr):
    """out[n, m] (+)= Σ_c a[n·C + c] · b[m·C + c]; a: (Na·C, P), b: (Nb·C, P), out: (Na, Nb) float32.
    SINGLE: C == 1.

    C = 1 is the full kernel (a plain tiled matmul). 1-D grid of cdiv(Na, BLOCK_N) ·
    cdiv(Nb, BLOCK_M) programs in grouped order (GROUP row tiles share their b tiles in L2).
    """
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(Na, BLOCK_N)
    tiles_m = tl.cdiv(Nb, BLOCK_M)
    group = GROUP * tiles_m
    first = (pid // group) * GROUP
    size = tl.minimum(tiles_n - first, GROUP)
    pid_n = first + (pid % group) % size
    pid_m = (pid % group) // size
    # upper: a tile whose last column precedes its first row lies wholly below the diagonal.
    live = pid_m >= 0
    if UPPER:
        live = pid_m * BLOCK_M + BLOCK_M - 1 >= pid_n * BLOCK_N
    if live:
        n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        n_ok = n < Na
        m_ok = m < Nb
        if SINGLE:
            # C = 1: the dot's own accumulator is the result. A second tile-sized accumulator
            # beside it doubles the live registers (128 × 256 at 8 warps: 2 × 128 per thread)
            # and made ptxas spill 4.4 KB per thread in the sm_90 build.
            acc = _dot_rows(a_ptr, b_ptr, n, m, n_ok, m_ok, P, sa0, sa1, sb0, sb1,
                            BLOCK_N, BLOCK_M, BLOCK_K, UPCAST, PRECISION)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for c in range(0, C):
                # One float32 add per channel rather than chaining every channel through the
                # tensor cores' truncating accumulator (C·P/16 steps for bfloat16).
                acc += _dot_rows(a_ptr, b_ptr, n * C + c, m * C + c, n_ok, m_ok, P, sa0, sa1, sb0, sb1,
                                 BLOCK_N, BLOCK_M, BLOCK_K, UPCAST, PRECISION)
        mask = n_ok[:, None] & m_ok[None, :]
        if UPPER:
            mask = mask & (m[None, :] >= n[:, None])
        ptrs = out_ptr + n[:, None] * so0 + m[None, :] * so1
        if ACCUMULATE:
            acc += tl.load(ptrs, mask=mask, other=0.0)  # masked: below-diagonal values are never read
        tl.store(ptrs, acc, mask=mask)


def gram_tile_triton(a: torch.Tensor, b: torch.Tensor, *, want: str, num_outputs: int,
                     out: torch.Tensor | None, traced: torch.Tensor | None, accumulate: bool, upper: bool,
                     fp32_dot: str = FP32_DOT):
    """Validated inputs (see :func:`engine.ops.gram_tile.gram_tile`) → ``(full | None, traced | None)``.

    fp32_dot: the float32 dot form, ``"tf32x3"`` or ``"ieee"`` (module docstring)."""
    if fp32_dot not in ("tf32x3", "ieee"):
        raise ValueError(f"fp32_dot must be 'tf32x3' or 'ieee', got {fp32_dot!r}")
    c = int(num_outputs)
    ra, rb = a.shape[0], b.shape[0]
    want_full, want_traced = want in ("full", "both"), want in ("traced", "both")
    if want_full and out is None:
        out = torch.zeros(ra, rb, dtype=torch.float32, device=a.device)
    if want_traced and traced is None:
        traced = torch.zeros(ra // c, rb // c, dtype=torch.float32, device=a.device)
    full_out = out if want_full else None
    traced_out = traced if want_traced else None
    if ra == 0 or rb == 0:
        return full_out, traced_out
    if want_full:
        _launch(a, b, full_out, 1, accumulate, upper, fp32_dot)
    if want_traced:
        _launch(a, b, traced_out, c, accumulate, upper, fp32_dot)
    return full_out, traced_out


def _launch(a, b, out, c, accumulate, upper, fp32_dot):
    """out (+)= the C-traced product of a and b (C = 1: the full product)."""
    na, nb, p = a.shape[0] // c, b.shape[0] // c, a.shape[1]
    precision = fp32_dot if a.dtype == torch.float32 else "ieee"
    block_n, block_m, block_k, num_warps, num_stages = _config(a.dtype, na, nb, a.device, precision, c == 1)
    # The interpreter does bfloat16 arithmetic on the raw uint16 bits; upcasting first is
    # exact and the accumulation is float32 either way.
    upcast = a.dtype == torch.bfloat16 and triton_interpreted()
    grid = (triton.cdiv(na, block_n) * triton.cdiv(nb, block_m),)
    _gram_tile_kernel[grid](
        a, b, out, na, nb, p, c, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=bool(accumulate), UPPER=bool(upper), UPCAST=upcast,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, GROUP=GROUP_N, PRECISION=precision, SINGLE=c == 1,
        num_warps=num_warps, num_stages=num_stages)
