"""Pieces shared by every model: weight initialisation, global pooling, and the layers that keep
running statistics."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def global_avg_pool(x: Tensor) -> Tensor:
    """Mean over the spatial dims, (N, C, H, W) -> (N, C).

    A plain mean rather than ``nn.AdaptiveAvgPool2d``: the latter's CUDA backward
    is non-deterministic, which would break bit-identical twin runs.
    """
    return x.mean(dim=(2, 3))


def _init_conv(m: nn.Module) -> None:
    # fan_out keeps the backward signal's variance stable through ReLU stacks.
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _init_linear(m: nn.Module) -> None:
    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    nn.init.zeros_(m.bias)


def _init_batchnorm(m: nn.Module) -> None:
    nn.init.ones_(m.weight)
    nn.init.zeros_(m.bias)


# The init rule of each layer type; a subclass gets the rule of its nearest registered base
# (looked up along its MRO). Layers without a rule keep torch's default initialisation.
INIT_RULES: dict[type[nn.Module], Callable[[nn.Module], None]] = {
    nn.Conv2d: _init_conv,
    nn.Linear: _init_linear,
    nn.BatchNorm2d: _init_batchnorm,
}


def init_rule(module: nn.Module) -> Callable[[nn.Module], None] | None:
    """The rule in :data:`INIT_RULES` for ``module``'s type or its nearest base, else None."""
    return next((INIT_RULES[t] for t in type(module).__mro__ if t in INIT_RULES), None)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal conv/linear weights, zero biases, BatchNorm at identity (:data:`INIT_RULES`),
    module by module in ``model.modules()`` order, so that a seed gives the same weights."""
    for m in model.modules():
        rule = init_rule(m)
        if rule is not None:
            rule(m)


def running_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each layer of ``model`` that keeps running statistics (BatchNorm, or a
    norm built with ``track_running_stats=True``), in ``named_modules`` order.

    Told by what callers use, not by type: a ``track_running_stats`` flag that is set, the
    ``running_mean``/``running_var`` buffers, and ``reset_running_stats()``.
    """
    return [(name, m) for name, m in model.named_modules()
            if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
            and getattr(m, "running_var", None) is not None and callable(getattr(m, "reset_running_stats", None))]
