"""Pieces shared by every model: weight initialisation and global pooling."""

from __future__ import annotations

from torch import Tensor, nn


def global_avg_pool(x: Tensor) -> Tensor:
    """Mean over the spatial dims, (N, C, H, W) -> (N, C).

    A plain mean rather than ``nn.AdaptiveAvgPool2d``: the latter's CUDA backward
    is non-deterministic, which would break bit-identical twin runs.
    """
    return x.mean(dim=(2, 3))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal conv/linear weights, zero biases, BatchNorm at identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # fan_out keeps the backward signal's variance stable through ReLU stacks.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
