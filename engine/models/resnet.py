"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", Sec. 4.2).

A 3x3 conv to 16 channels, then three stages of ``n`` basic blocks with 16, 32 and
64 channels (the first block of stages 2 and 3 halves the resolution), global
average pooling and a linear head: 6n + 2 weight layers. Shortcuts are option A
(parameter-free), so the counts match the paper's table:

=========  ===  ===================================
model       n   trainable parameters (10 classes)
=========  ===  ===================================
resnet20    3   269,722
resnet32    5   464,154
resnet56    9   853,018
=========  ===  ===================================
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.common import global_avg_pool, init_weights


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (the BatchNorm after it has one)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels.

    Parameter-free, which is what makes resnet20 exactly 269,722 parameters.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        extra = out_channels - in_channels
        # Split the zero channels evenly on both sides, as in the reference code.
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, *self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection around them."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ShortcutA(in_channels, out_channels)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add: torch.func transforms reject in-place updates of inputs.
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; see the module docstring for counts."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(global_avg_pool(x))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (n=3): 269,722 parameters with 10 classes."""
    return CifarResNet(3, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (n=5): 464,154 parameters with 10 classes."""
    return CifarResNet(5, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (n=9): 853,018 parameters with 10 classes."""
    return CifarResNet(9, num_classes)
