"""Small models for fast experiments and tests: an MLP and a BatchNorm CNN.

With the default widths and 10 classes:

=====  =========  ====================
model  width      trainable parameters
=====  =========  ====================
mlp    128 (def)  411,146
cnn    16 (def)   24,346
=====  =========  ====================
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import ConfigError
from engine.models.common import global_avg_pool, init_weights


def _check_width(name: str, width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"{name}: width must be a positive integer, got {width!r}")


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear -> ReLU -> Linear (two hidden layers).

    ``width * (in_features + width + num_classes + 2) + num_classes`` parameters:
    411,146 for 3x32x32 inputs, width 128 and 10 classes.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 128,
        in_shape: tuple[int, ...] = (3, 32, 32),
    ):
        super().__init__()
        _check_width("mlp", width)
        if not in_shape or any(int(d) < 1 for d in in_shape):
            raise ConfigError(f"mlp: in_shape must be positive dimensions, got {in_shape!r}")
        self.in_shape = tuple(int(d) for d in in_shape)
        self.fc1 = nn.Linear(math.prod(self.in_shape), width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class SmallCNN(nn.Module):
    """Three 3x3 convs (w, 2w, 4w channels) with BatchNorm, global mean, linear head.

    conv-pool-BN-ReLU, conv-pool-BN-ReLU, conv-BN-ReLU at 32, 16 and 8 pixels.
    Cheap enough to train on a CPU (forward+backward at batch 128 in ~25 ms on
    2 cores) yet with BatchNorm, so it exercises the same buffer handling as the
    large models. 24,346 parameters at width 16 and 10 classes.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        _check_width("cnn", width)
        c1, c2, c3 = width, 2 * width, 4 * width
        # No conv bias: the BatchNorm right after each conv makes it redundant.
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        # Pool straight after the conv: BN and ReLU then touch a quarter of the
        # activations, which on a CPU is ~25% of the step time. ReLU commutes with
        # max, so this is nearly the conv-BN-ReLU-pool function at lower cost.
        x = F.relu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        x = F.relu(self.bn2(F.max_pool2d(self.conv2(x), 2)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(global_avg_pool(x))


def mlp(num_classes: int = 10, width: int = 128, in_shape: tuple[int, ...] = (3, 32, 32)) -> MLP:
    """Two-hidden-layer MLP on flattened images: 411,146 parameters by default."""
    return MLP(num_classes, width=width, in_shape=in_shape)


def cnn(num_classes: int = 10, width: int = 16) -> SmallCNN:
    """Small BatchNorm CNN: 24,346 parameters by default."""
    return SmallCNN(num_classes, width=width)
