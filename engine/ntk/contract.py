"""Tile contractions: ``tile += Ja Jbᵀ`` for every kernel kind, the one place kernels are multiplied.

Operands are column chunks ``(n, K, w)`` of two row blocks' Jacobians. The full kernel (and the
pNTK, K = 1) multiplies ``(n·K, w)`` rows; the traced kernel ``(n, K·w)`` rows (Σ_c of the C × C
blocks in one product); the diagonal kernel the per-sample ``(K, w)`` blocks. Symmetric diagonal
tiles compute only column strips of their upper triangle (:func:`symmetrize` mirrors at the end); long
inner dimensions are split; bfloat16 operands accumulate in float32.
"""

from __future__ import annotations

import itertools
from functools import cache

import torch
from torch import Tensor

from .kinds import KernelKind

__all__ = ["bf16_matrix_unit", "bf16_mode", "bf16_unit_name", "contract", "gram_into", "round_bf16", "symmetrize"]

# Strips of a symmetric diagonal tile: each column strip multiplies only the rows at and
# above its last column. Strips narrower than this lose more to BLAS efficiency than they
# save.
_STRIP_ROWS = 128
# Longest inner dimension of one product (see gram_into).
_INNER = 8192


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_unit_name(flags: frozenset[str] | set[str] | None = None) -> str:
    """This CPU's bfloat16 matrix unit from its flags (default: /proc/cpuinfo's): "AMX",
    "AVX-512 BF16" or "none" (AVX2-only: bfloat16 products are emulated, no faster than float32)."""
    flags = _cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX-512 BF16" if "avx512_bf16" in flags else "none"


def bf16_matrix_unit() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    return bf16_unit_name() != "none"


def bf16_mode(bf16: bool, device: torch.device) -> str | None:
    """None (no rounding), "native" (bfloat16 products, float32 accumulation) or "emulate"
    (round to bfloat16, multiply in float32: no bfloat16 matrix unit on this CPU)."""
    if not bf16:
        return None
    return "native" if device.type == "cuda" or bf16_matrix_unit() else "emulate"


def round_bf16(t: Tensor, mode: str | None) -> Tensor:
    if mode == "emulate":
        return t.copy_(t.to(torch.bfloat16))
    if mode == "native":
        return t.to(torch.bfloat16)
    return t


def _mm_into(out: Tensor, a: Tensor, b: Tensor, mode: str | None) -> None:
    """out += a @ bᵀ, in float32 accumulation."""
    if mode == "native":
        if out.device.type == "cuda":
            out.add_(torch.mm(a, b.T, out_dtype=out.dtype))
        else:
            out.add_(torch.mm(a, b.T))
        return
    out.addmm_(a, b.T)


def gram_into(out: Tensor, a: Tensor, b: Tensor, sym: bool, mode: str | None) -> None:
    """out (ra, rb) += a (ra, w) @ b (rb, w)ᵀ; for ``sym`` (a is b) only the upper-triangle strips.

    The inner dimension is split into pieces of at most ``_INNER`` columns: a CPU BLAS may sum
    a long inner dimension of a small product in one running sum (float32 error ~1e-5 at 10⁵
    columns, against ~1e-7 when split).
    """
    w = a.shape[1]
    if w > _INNER:
        for c0 in range(0, w, _INNER):
            gram_into(out, a[:, c0:c0 + _INNER], b[:, c0:c0 + _INNER], sym, mode)
        return
    rows = a.shape[0]
    if not sym or rows < 2 * _STRIP_ROWS:
        _mm_into(out, a, b, mode)
        return
    # Column strips: strip [c0, c1) takes rows [0, c1) (its part of the upper triangle). Against row
    # strips of the same width, the long side of each product is its row count, which CPU BLAS
    # blocks best (benchmarks/results/README.md, Gram strips).
    strips = rows // _STRIP_ROWS
    edges = [round(i * rows / strips) for i in range(strips + 1)]
    for c0, c1 in itertools.pairwise(edges):
        _mm_into(out[:c1, c0:c1], a[:c1], b[c0:c1], mode)


def contract(out: Tensor, ja: Tensor, jb: Tensor | None, kind: KernelKind, sym: bool, mode: str | None) -> None:
    """Add the columns' contribution to the tile ``out``; ja (na, K, w), jb (nb, K, w) or None (= ja).

    ``out``: (na·K, nb·K) for full and pNTK, (na, nb) traced, (na, K, K) diagonal; ``sym``: a
    diagonal tile of a symmetric kernel (jb None), only its upper triangle is needed; ``mode``:
    see :func:`bf16_mode` (the operands are rounded in place for "emulate").
    """
    ja = round_bf16(ja, mode)
    jb = ja if jb is None else round_bf16(jb, mode)
    na, k, w = ja.shape
    if kind is KernelKind.DIAGONAL:
        for c0 in range(0, w, _INNER):  # split inner dimension, as in gram_into
            p = ja[:, :, c0:c0 + _INNER]
            if mode == "native":
                out.add_(torch.bmm(p, p.transpose(1, 2)))
            else:
                out.baddbmm_(p, p.transpose(1, 2))
    elif kind is KernelKind.TRACED:
        gram_into(out, ja.reshape(na, k * w), jb.reshape(jb.shape[0], k * w), sym, mode)
    else:
        gram_into(out, ja.reshape(na * k, w), jb.reshape(-1, w), sym, mode)


def symmetrize(h: Tensor, tile: int = 2048) -> Tensor:
    """Copy the upper triangle onto the lower one in place, tile by tile (exact symmetry,
    O(tile²) extra memory); a (N, C, C) diagonal kernel per sample block."""
    if h.dim() == 3:
        h.copy_(torch.triu(h) + torch.triu(h, 1).transpose(1, 2))
        return h
    m = h.shape[0]
    for r0 in range(0, m, tile):
        r1 = min(r0 + tile, m)
        d = h[r0:r1, r0:r1]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
        if r1 < m:
            h[r1:, r0:r1] = h[r0:r1, r1:].T
    return h
