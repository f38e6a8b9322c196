"""The Linear rule against torch.func: (n, I) inputs (with its closed-form Gram), (n, L, d) tokens, no bias."""

from __future__ import annotations

import torch
from torch import nn

from tests.ntk._rule_check import check_rule
from tests.seeding import seeded


def _x(*shape):
    gen, _ = seeded()
    return torch.randn(*shape, generator=gen)


def test_linear_on_rows():
    check_rule(nn.Linear(7, 5), _x(6, 7), "Linear(7, 5) on (6, 7)")


def test_linear_on_tokens():
    check_rule(nn.Linear(5, 3), _x(4, 9, 5), "Linear(5, 3) on (4, 9, 5)")


def test_linear_without_bias_on_two_extra_dims():
    check_rule(nn.Linear(4, 6, bias=False), _x(3, 2, 5, 4), "Linear(4, 6, bias=False) on (3, 2, 5, 4)")
