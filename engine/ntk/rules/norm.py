"""Norm layers: BatchNorm (eval mode, running statistics), LayerNorm, GroupNorm. dweight = Σ g·x̂ and
dbias = Σ g over every dim but the parameter's. An eval-mode BatchNorm is also a per-channel affine
map, so a layer feeding only it borrows its output gradient (``input_scale``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import LayerRule, register
from .write import scaled, store

__all__ = ["is_batch_dependent"]


def _norm_store(xhat: Tensor, g: Tensor, lead: int, width: int, dests: Mapping[str, Tensor], accumulate: bool) -> None:
    """Store dweight = Σ g·x̂ and dbias = Σ g over all dims except the parameter's.

    xhat: (n, R, width, S) after reshape (R = dims before the parameter's, S = after);
    g: (n, K, R, width, S).
    """
    n, k = g.shape[:2]
    g5 = g.reshape(n, k, lead, width, -1)
    if "weight" in dests:
        # In g's dtype: bfloat16 gradients meet bfloat16 x̂, not a float32 copy of the product.
        x4 = xhat.reshape(n, 1, lead, width, -1).to(g5.dtype)
        store(dests["weight"], (g5 * x4).sum(dim=(2, 4)), accumulate)
    if "bias" in dests:
        store(dests["bias"], g5.sum(dim=(2, 4)), accumulate)


def _bn_supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    return not m.training and m.running_mean is not None and a.dim() >= 2


def _bn_compute(m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool,
                scale: Tensor | None) -> None:
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    _norm_store(xhat, scaled(g, scale), 1, a.shape[1], dests, accumulate)


def _bn_input_scale(m: nn.Module) -> Tensor:
    # Eval-mode BatchNorm is y = (x − μ)·γ/σ + β, so ∂y/∂x = γ/σ per channel.
    s = torch.rsqrt(m.running_var + m.eps)
    return s if m.weight is None else s * m.weight.detach()


for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register(_bn, LayerRule(("weight", "bias"), _bn_supports, _bn_compute, _bn_input_scale))


def is_batch_dependent(module: nn.Module) -> bool:
    """True for a BatchNorm that normalises with batch statistics even in eval mode."""
    return isinstance(module, _BatchNorm) and (not module.track_running_stats or module.running_mean is None)


def _ln_supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    return a.dim() > len(m.normalized_shape)


def _ln_compute(m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool,
                scale: Tensor | None) -> None:
    g = scaled(g, scale)
    xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    width = math.prod(m.normalized_shape)
    lead = a[0].numel() // width
    _norm_store(xhat, g, lead, width, dests, accumulate)


register(nn.LayerNorm, LayerRule(("weight", "bias"), _ln_supports, _ln_compute))


def _gn_supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    return a.dim() >= 2


def _gn_compute(m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool,
                scale: Tensor | None) -> None:
    g = scaled(g, scale)
    xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
    _norm_store(xhat, g, 1, a.shape[1], dests, accumulate)


register(nn.GroupNorm, LayerRule(("weight", "bias"), _gn_supports, _gn_compute))
