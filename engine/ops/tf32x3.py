"""Reference for the "tf32x3" float32 dot the Triton kernels use on NVIDIA tensor cores.

Triton lowers ``tl.dot(a, b, input_precision="tf32x3")`` on float32 operands to three tf32
tensor-core products (its ``F32DotTC`` pass, the 3xTF32 trick of CUTLASS):

    hi = cvt.rna.tf32(x)                 round to 11 significant bits, ties away from zero
    lo = x − hi                          exact in float32
    dot = (lo_a·hi_b + hi_a·lo_b) + hi_a·hi_b     each a tf32 mma, float32 accumulation

A tf32 mma reads only the top 19 bits of each float32 operand, so ``lo`` enters truncated
(:func:`tf32_truncate`); ``hi`` is already a tf32 value. The products of 11-bit
significands are exact in float32. Per product a·b the error is therefore

    |hi_a (lo_b − trunc lo_b) + (lo_a − trunc lo_a) hi_b + lo_a lo_b|
        ≤ (2 (1 + 2⁻¹¹) 2⁻²¹ + 2⁻²²) |a||b|  ≈  2.5 · 2⁻²¹ |a||b|  (`PRODUCT_REL_BOUND`)

since |lo| ≤ 2⁻¹¹|x| (half an 11-bit ulp) and truncating lo to 11 bits loses < 2⁻¹⁰|lo|.
That is about 20 float32 units in the worst case per product; random inputs see a few
(roughly 22 effective bits against float32's 24), plus the float32 accumulation shared with
an ordinary float32 matmul. :func:`tf32x3` evaluates the same arithmetic with torch on any
device, which the GPU tests use as the "plain torch at the same precision" yardstick
(``tests/_tolerance.py``): the tensor-core result must be within a few times its error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PRODUCT_REL_BOUND = (2 * (1 + 2.0**-11) * 2.0**-21) + 2.0**-22
_LOW = 0x1FFF   # the 13 float32 significand bits a tf32 value does not have
_HALF = 0x1000  # half a tf32 unit in the last place, in float32 bits


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 → the nearest tf32 value (11 significant bits), ties away from zero, as
    PTX ``cvt.rna.tf32.f32``. Finite inputs (an exponent overflow rounds to ±inf)."""
    if x.dtype != torch.float32:
        raise TypeError(f"tf32_round needs float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    # Sign-magnitude: adding half a unit to the magnitude bits and clearing the low bits
    # rounds the magnitude half away from zero, whatever the sign.
    return ((bits + _HALF) & ~_LOW).view(torch.float32).reshape(x.shape)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """float32 → tf32 by dropping the low 13 significand bits: how a tf32 mma reads an operand."""
    if x.dtype != torch.float32:
        raise TypeError(f"tf32_truncate needs float32, got {x.dtype}")
    return (x.contiguous().view(torch.int32) & ~_LOW).view(torch.float32).reshape(x.shape)


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo with hi = tf32_round(x) (exact); returns (hi, lo as the mma reads it)."""
    hi = tf32_round(x)
    return hi, tf32_truncate(x - hi)


def tf32x3(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor
           ) -> torch.Tensor:
    """A bilinear float32 ``op(a, b)`` (a matmul, an einsum) evaluated as Triton's tf32x3 dot:
    ``(op(lo_a, hi_b) + op(hi_a, lo_b)) + op(hi_a, hi_b)`` in float32. Products of the parts
    are exact in float32, so only the accumulation order differs from the tensor cores."""
    a_hi, a_lo = split(a.float())
    b_hi, b_lo = split(b.float())
    return (op(a_lo, b_hi) + op(a_hi, b_lo)) + op(a_hi, b_hi)
