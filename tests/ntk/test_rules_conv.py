"""The conv rules against torch.func: Conv1d and Conv2d with stride, padding, dilation, groups,
'same' padding with a non-zero padding mode, no bias, a channels-last input, a 1×1 output map."""

from __future__ import annotations

import torch
from torch import nn

from tests.ntk._rule_check import check_rule
from tests.seeding import seeded


def _x(*shape):
    gen, _ = seeded()
    return torch.randn(*shape, generator=gen)


def test_conv2d_stride_padding_dilation():
    check_rule(nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), _x(4, 3, 7, 9), "Conv2d")


def test_conv2d_groups_without_bias():
    check_rule(nn.Conv2d(6, 9, 3, groups=3, bias=False), _x(3, 6, 5, 7), "grouped Conv2d")


def test_conv2d_same_reflect():
    check_rule(nn.Conv2d(2, 3, 4, padding="same", padding_mode="reflect"), _x(3, 2, 6, 5), "Conv2d same/reflect")


def test_conv1d():
    check_rule(nn.Conv1d(4, 5, 3, stride=2, padding=1), _x(5, 4, 11), "Conv1d")


def test_conv2d_channels_last_input_and_a_map_the_kernel_just_fits():
    # The patches are a strided view of the input as it lies in memory: a channels-last input
    # without padding is read through its own strides, and a 3x3 kernel on a 3x3 map has one position.
    x = _x(3, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    check_rule(nn.Conv2d(4, 3, 2, stride=(2, 1), dilation=(1, 2)), x, "Conv2d channels-last")
    check_rule(nn.Conv2d(4, 2, 3), _x(2, 4, 3, 3), "Conv2d 1x1 output map")
