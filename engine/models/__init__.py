"""Model zoo: CIFAR-10 networks built by name.

Every model takes float images of shape (N, 3, 32, 32) and returns logits of
shape (N, num_classes). All of them are written to work under ``torch.func``
(``functional_call``, ``vmap``, ``jacrev``): no in-place activations, no dropout,
and global pooling is a plain mean (``nn.AdaptiveAvgPool2d`` has a
non-deterministic CUDA backward, which would break bit-identical twin runs).

Parameter counts with 10 classes and default options:

========  ==========
name      parameters
========  ==========
mlp          411,146
cnn           24,346
resnet20     269,722
resnet32     464,154
resnet56     853,018
vgg11      9,231,114
vgg16     14,728,266
========  ==========
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from engine.errors import ConfigError
from engine.models.common import running_stat_layers
from engine.models.resnet import resnet20, resnet32, resnet56
from engine.models.small import cnn, mlp
from engine.models.vgg import vgg11, vgg16

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg11": vgg11,
    "vgg16": vgg16,
}

MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)

__all__ = ["MODEL_NAMES", "build_model", "count_parameters", "running_stat_layers"]


def _options(factory: Callable[..., nn.Module]) -> list[str]:
    """The keyword options a factory accepts besides ``num_classes``."""
    params = inspect.signature(factory).parameters
    return [p for p in params if p != "num_classes"]


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build the model called ``name`` with freshly initialised weights.

    Initialisation draws from torch's global RNG, so the same ``torch.manual_seed``
    gives identical weights. The returned module carries ``model.arch = name``.
    Raises ``ConfigError`` for an unknown name, ``num_classes < 1`` or an option
    the model does not take.
    """
    factory = _FACTORIES.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    options = _options(factory)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        valid = ", ".join(options) if options else "none"
        raise ConfigError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}; valid options: {valid}"
        )
    model = factory(num_classes=num_classes, **kwargs)
    model.arch = name
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable (``requires_grad``) parameter elements in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
