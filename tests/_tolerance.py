"""Tolerances derived from precision: a fast path may be a few times less exact than
plain torch at the same precision, both measured against a float64 reference."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``ref`` (computed in float64)."""
    ref = ref.double()
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close_to_torch(fast: torch.Tensor, torch_same_precision: torch.Tensor, ref64: torch.Tensor,
                          *, factor: float = 4.0, what: str = "") -> None:
    """Assert the fast result's error is at most ``factor`` × torch's own error (at the same
    precision, against the float64 reference), with one unit of that precision as floor."""
    eps = torch.finfo(torch_same_precision.dtype).eps
    e_fast, e_torch = rel_err(fast, ref64), rel_err(torch_same_precision, ref64)
    assert e_fast <= factor * max(e_torch, eps), f"{what}: error {e_fast:.3g} vs torch's {e_torch:.3g}"
