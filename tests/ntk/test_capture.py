"""Tests for engine.ntk.capture: which parameters the structured backend serves by a layer rule and
which it sends to the torch.func fallback (odd shapes, reuse, tied weights, in-place edits, a
subclass with its own forward), each checked against a float64 reference as in test_jacobian.py."""


from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.ntk.jacobian import jacobian, parameter_layout, structured_coverage
from tests.ntk._jacobian_check import (
    OddConvNet,
    OddSeqNet,
    SharingNet,
    check_against_float64,
)

pytestmark = pytest.mark.usefixtures("fresh_seed")  # a fresh, printed torch seed per test (tests/ntk/conftest.py)


ODD_CASES = [(1, 7), (3, 1), (5, 3)]  # (N, C)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # intended: asymmetric padding
@pytest.mark.parametrize(("n", "c"), ODD_CASES)
def test_odd_conv_shapes(n, c):
    model = OddConvNet(c)
    check_against_float64(model, lambda: torch.randn(n, 3, 7, 9), what=f"OddConvNet n={n} c={c}")
    cov = structured_coverage(model)
    assert cov["prelu.weight"] == "fallback" and cov["scale.gain"] == "fallback"
    assert {v for k, v in cov.items() if not k.startswith(("prelu", "scale"))} == {"structured"}


@pytest.mark.parametrize(("n", "c"), ODD_CASES)
def test_odd_sequence_shapes(n, c):
    model = OddSeqNet(c)
    check_against_float64(model, lambda: torch.randn(n, 5, 11), what=f"OddSeqNet n={n} c={c}")
    assert set(structured_coverage(model).values()) == {"structured"}


@pytest.mark.parametrize(("n", "c"), ODD_CASES)
def test_reuse_tying_and_inplace(n, c):
    model = SharingNet(c)
    x = torch.randn(n, 7)
    check_against_float64(model, lambda: x, what=f"SharingNet n={n} c={c}")
    static = structured_coverage(model)
    assert set(static.values()) == {"structured"}  # types alone look fine ...
    dynamic = structured_coverage(model, x)  # ... one forward finds the problems
    assert dynamic["shared.weight"] == "structured" and dynamic["shared.bias"] == "structured"
    assert dynamic["head.weight"] == "fallback" and dynamic["head.bias"] == "structured"
    assert dynamic["edited.weight"] == "fallback" and dynamic["edited.bias"] == "fallback"
    layout = {name: (s, e) for name, _, s, e in parameter_layout(model)}
    j = jacobian(model.eval(), x)
    s, e = layout["unused.weight"]
    assert torch.count_nonzero(j[:, s:e]) == 0


class WSConv(nn.Conv2d):
    """A Conv2d subclass that transforms its weight: it must not inherit the conv rule."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_subclass_with_own_forward_falls_back():
    model = nn.Sequential(WSConv(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 3))
    assert structured_coverage(model)["0.weight"] == "fallback"
    assert structured_coverage(model)["2.weight"] == "structured"
    check_against_float64(model, lambda: torch.randn(2, 3, 5, 5), what="WSConv")


