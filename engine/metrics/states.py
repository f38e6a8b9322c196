"""Two states of one architecture, checked against the model and each other, and the inputs the
twin metrics read (:mod:`engine.metrics.twins`): every error is one line, raised before any work."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["Pair", "State", "batches", "check_batch_size", "check_data", "check_inputs", "check_label_range",
           "check_pair"]

State = Mapping[str, Tensor]


def _fmt_shape(shape: Sequence[int]) -> str:
    dims = [str(int(d)) for d in shape]
    return "(" + ",".join(dims) + ("," if len(dims) == 1 else "") + ")"


@dataclass(frozen=True)
class Pair:
    """Two validated states in the model's key order, on one device."""

    keys: tuple[str, ...]          # every state_dict key, model order
    params: tuple[str, ...]        # the trainable-parameter keys among them
    a: dict[str, Tensor]
    b: dict[str, Tensor]
    device: torch.device
    dtype: torch.dtype             # floating dtype of the parameters (inputs are cast to it)


def check_pair(model: nn.Module, state_a: State, state_b: State) -> Pair:
    """Check both states against the model template and each other; name the first bad key."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module (the architecture template), got {type(model).__name__}")
    template = model.state_dict(keep_vars=True)
    params = tuple(n for n, _ in model.named_parameters())
    if not params:
        raise ConfigError(f"model {type(model).__name__} has no parameters to compare")
    for label, state in (("state_a", state_a), ("state_b", state_b)):
        if not isinstance(state, Mapping):
            raise ConfigError(f"{label} must be a dict of tensors like model.state_dict(), got {type(state).__name__}")
    for key, ref in template.items():
        for label, state in (("state_a", state_a), ("state_b", state_b)):
            if key not in state:
                raise ConfigError(f"{label} lacks {key}")
            t = state[key]
            if not isinstance(t, Tensor):
                raise ConfigError(f"{label}[{key!r}] is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != tuple(ref.shape):
                raise ConfigError(
                    f"{label} does not fit the model: shape {_fmt_shape(t.shape)} vs {_fmt_shape(ref.shape)} for {key}"
                )
        ta, tb = state_a[key], state_b[key]
        if ta.dtype != tb.dtype:
            raise ConfigError(f"dtype {ta.dtype} in state_a vs {tb.dtype} in state_b for {key}")
        if key in params and not ta.is_floating_point():
            raise ConfigError(f"parameter {key} has non-floating dtype {ta.dtype}")
    for label, state in (("state_a", state_a), ("state_b", state_b)):
        for key in state:
            if key not in template:
                raise ConfigError(f"{label} has {key}, which the model ({type(model).__name__}) does not")
    device = state_a[params[0]].device
    dtype = state_a[params[0]].dtype
    keys = tuple(template)
    a = {k: state_a[k].detach().to(device) for k in keys}
    b = {k: state_b[k].detach().to(device) for k in keys}
    for label, state in (("state_a", a), ("state_b", b)):
        for key in keys:
            t = state[key]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ConfigError(f"{label} has non-finite values in {key} (a diverged run?)")
    return Pair(keys=keys, params=params, a=a, b=b, device=device, dtype=dtype)


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def check_inputs(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise ConfigError(f"{name} must be a tensor of model inputs, got {type(x).__name__}")
    if x.ndim == 0 or len(x) == 0:
        raise ConfigError(f"{name} is empty; need at least one input")
    if x.dtype == torch.uint8:
        raise ConfigError(f"{name} is uint8 images; normalize them first (engine.data.stream.normalize)")
    return x


def check_data(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    x = check_inputs("x", x)
    if not isinstance(y, Tensor):
        raise ConfigError(f"y must be a tensor of int64 class labels, got {type(y).__name__}")
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"y must be a 1-D tensor of integer class labels, got {y.dtype} of shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise ConfigError(f"x has {len(x)} inputs but y has {len(y)} labels")
    if int(y.min()) < 0:
        raise ConfigError(f"y has a negative label ({int(y.min())})")
    return x, y


def check_label_range(y_max: int, num_classes: int) -> None:
    if y_max >= num_classes:
        raise ConfigError(f"y has label {y_max} but the model has {num_classes} outputs")



def batches(x: Tensor, batch_size: int, device: torch.device, dtype: torch.dtype) -> Iterator[Tensor]:
    """``x`` in consecutive slices, moved to ``device`` (floating inputs cast to ``dtype``)."""
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        yield xb.to(device, dtype if xb.is_floating_point() else None, non_blocking=True)
