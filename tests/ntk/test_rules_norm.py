"""The norm rules against torch.func: BatchNorm (eval, running statistics; its input scale),
LayerNorm over the last dims of tokens, GroupNorm."""

from __future__ import annotations

import torch
from torch import nn

from engine.ntk.rules import is_batch_dependent, rule_for
from tests.ntk._rule_check import check_rule
from tests.seeding import seeded


def _x(*shape):
    gen, _ = seeded()
    return torch.randn(*shape, generator=gen)


def _bn(cls, c):
    gen, _ = seeded()
    bn = cls(c)
    bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
    bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))
    return bn.eval()


def test_batchnorm2d_eval():
    check_rule(_bn(nn.BatchNorm2d, 5), _x(4, 5, 3, 7), "BatchNorm2d")


def test_batchnorm1d_eval_on_rows_and_sequences():
    check_rule(_bn(nn.BatchNorm1d, 6), _x(5, 6), "BatchNorm1d on (5, 6)")
    check_rule(_bn(nn.BatchNorm1d, 3), _x(4, 3, 7), "BatchNorm1d on (4, 3, 7)")


def test_batchnorm_input_scale_is_its_slope():
    bn = _bn(nn.BatchNorm2d, 4)
    x = _x(3, 4, 2, 5).requires_grad_()
    y = bn(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    s = rule_for(bn).input_scale(bn)
    torch.testing.assert_close(gx, s.view(1, -1, 1, 1).expand_as(gx))
    assert not is_batch_dependent(bn) and is_batch_dependent(nn.BatchNorm2d(4, track_running_stats=False))


def test_layernorm_on_tokens():
    check_rule(nn.LayerNorm((5, 3)), _x(4, 7, 5, 3), "LayerNorm((5, 3))")


def test_groupnorm():
    check_rule(nn.GroupNorm(3, 6), _x(4, 6, 5, 3), "GroupNorm(3, 6)")
