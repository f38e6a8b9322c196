"""The tf32x3 emulation (engine.ops.tf32x3) against independent float64 arithmetic.

It is the yardstick for the GPU tests of the Triton float32 dots, so its rounding must be
exactly PTX's cvt.rna.tf32.f32 and its error must obey the bound derived in its docstring.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.ops.tf32x3 import PRODUCT_REL_BOUND, split, tf32_round, tf32_truncate, tf32x3
from tests.seeding import seeded


def _rna11(v: float) -> float:
    """v rounded to 11 significant bits, ties away from zero, in exact float64 arithmetic."""
    if v == 0.0:
        return 0.0
    m, e = math.frexp(abs(v))           # |v| = m·2^e, m ∈ [0.5, 1)
    scaled = m * 2.0**11                 # 11 significant bits above the point
    r = math.floor(scaled + 0.5)         # halves go up: away from zero on the magnitude
    return math.copysign(r * 2.0 ** (e - 11), v)


def test_round_is_nearest_ties_away_and_exactly_tf32():
    gen, seed = seeded()
    x = torch.randn(4000, generator=gen) * torch.exp(torch.randn(4000, generator=gen).clamp(-4, 4) * 8)
    # Exact halfway cases: low 13 bits = 0x1000, both signs.
    halves = (torch.randint(0, 2**16, (500,), generator=gen, dtype=torch.int32) * 0x2000 + 0x3F80_1000)
    halves = halves.view(torch.float32) * torch.where(torch.arange(500) % 2 == 0, 1.0, -1.0)
    x = torch.cat([x, halves, torch.tensor([0.0, -0.0, 1.0, -3.0])])
    h = tf32_round(x)
    assert (h.view(torch.int32) & 0x1FFF).eq(0).all(), f"low bits left (seed={seed})"
    expect = torch.tensor([_rna11(v) for v in x.double().tolist()], dtype=torch.float64)
    assert torch.equal(h.double(), expect), f"rounding differs from round-half-away (seed={seed})"
    assert (h[-504:-4].abs() > x[-504:-4].abs()).all(), "halfway values must round away from zero"


def test_truncate_drops_low_bits_toward_zero():
    gen, seed = seeded()
    x = torch.randn(5000, generator=gen)
    t = tf32_truncate(x)
    assert (t.view(torch.int32) & 0x1FFF).eq(0).all()
    assert (t.abs() <= x.abs()).all() and (torch.sign(t) * torch.sign(x) >= 0).all(), seed
    assert ((x - t).abs() < x.abs() * 2.0**-10).all(), seed


def test_split_parts_bound():
    gen, seed = seeded()
    x = torch.randn(5000, generator=gen)
    hi, lo = split(x)
    assert torch.equal(tf32_round(hi), hi) and torch.equal(tf32_truncate(lo), lo)
    assert ((x - hi).abs() <= x.abs() * 2.0**-11).all(), seed
    assert ((x - hi - lo).abs() <= x.abs() * 2.0**-21).all(), seed


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 123), (64, 33, 1025)])
def test_products_within_the_derived_bound(shape):
    """Entry by entry: |tf32x3 − exact| ≤ (PRODUCT_REL_BOUND + γ_K)·(|a||b|)_ij, γ_K = K·2⁻²⁴
    the worst-case float32 accumulation (Higham); and far tighter than one tf32 pass."""
    gen, seed = seeded()
    n, m, k = shape
    a, b = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    got = tf32x3(lambda p, q: p @ q.T, a, b).double()
    exact = a.double() @ b.double().T
    scale = a.double().abs() @ b.double().abs().T
    bound = (PRODUCT_REL_BOUND + k * 2.0**-24) * scale
    assert ((got - exact).abs() <= bound).all(), f"seed={seed}"
    if n * m * k < 100:
        return  # one product's two rounding errors can be small by chance: the norms compare many
    one_pass = (tf32_round(a) @ tf32_round(b).T).double()
    err3, err1 = (got - exact).norm(), (one_pass - exact).norm()
    assert err3 * 100 < err1 or err1 == 0, f"tf32x3 {err3:.3g} not ≫ better than tf32 {err1:.3g} (seed={seed})"


def test_error_is_float32_class():
    """On a long random dot the emulated error is within a small factor of float32's own."""
    gen, seed = seeded()
    a, b = torch.randn(96, 8192, generator=gen), torch.randn(96, 8192, generator=gen)
    exact = a.double() @ b.double().T
    rel = lambda c: float((c.double() - exact).norm() / exact.norm())  # noqa: E731
    e3, e32 = rel(tf32x3(lambda p, q: p @ q.T, a, b)), rel(a @ b.T)
    assert e3 <= 4 * e32, f"tf32x3 {e3:.3g} vs float32 {e32:.3g} (seed={seed})"


def test_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        tf32_round(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        tf32_truncate(torch.zeros(3, dtype=torch.bfloat16))
    assert np.isfinite(PRODUCT_REL_BOUND) and 2.0**-21 < PRODUCT_REL_BOUND < 2.0**-19
