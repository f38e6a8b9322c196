"""CIFAR VGG with BatchNorm (Simonyan & Zisserman 2015, adapted to 32x32 inputs).

Each number in the config is a 3x3 conv (with bias) -> BatchNorm -> ReLU; each
``"M"`` is a 2x2 max-pool. Five pools take 32x32 down to 1x1, so the head is a
single ``Linear(512, num_classes)`` instead of the ImageNet MLP.

=======  ===================================
model    trainable parameters (10 classes)
=======  ===================================
vgg11     9,231,114
vgg16    14,728,266
=======  ===================================
"""

from __future__ import annotations

from torch import Tensor, nn

from engine.models.common import global_avg_pool, init_weights

CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
}  # fmt: skip


class VGG(nn.Module):
    """VGG-BN feature stack from ``cfg`` plus a linear classifier.

    ``features`` is one flat ``nn.Sequential`` (conv, bn, relu, ..., pool) so that
    parameter names match torchvision's ``features.<i>.weight`` convention.
    """

    def __init__(self, cfg: list[int | str], num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out_channels = int(v)
                layers += [
                    nn.Conv2d(in_channels, out_channels, 3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    # Not inplace: torch.func transforms reject in-place ops on inputs.
                    nn.ReLU(),
                ]
                in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        # The map is already 1x1 for 32x32 inputs; the mean also tolerates larger ones.
        return self.classifier(global_avg_pool(self.features(x)))


def vgg11(num_classes: int = 10) -> VGG:
    """VGG-11-BN: 9,231,114 parameters with 10 classes."""
    return VGG(CFGS["vgg11"], num_classes)


def vgg16(num_classes: int = 10) -> VGG:
    """VGG-16-BN: 14,728,266 parameters with 10 classes."""
    return VGG(CFGS["vgg16"], num_classes)
