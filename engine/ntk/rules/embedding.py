"""nn.Embedding: row v of the weight gets the sum of the output gradients of the tokens equal to v."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from . import LayerRule, register
from .write import scaled


def _supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    # max_norm renormalises the weight in place during the forward, and
    # scale_grad_by_freq rescales the gradient by batch counts: both are left to the fallback.
    return m.max_norm is None and not m.scale_grad_by_freq and not a.is_floating_point() and a.dim() >= 1


def _compute(m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool,
             scale: Tensor | None) -> None:
    if "weight" not in dests:
        return
    n, k = g.shape[:2]
    v, d = m.weight.shape
    ids = a.reshape(n, -1)
    g4 = scaled(g, scale).reshape(n, k, ids.shape[1], d)
    if m.padding_idx is not None:
        g4 = g4 * (ids != m.padding_idx).view(n, 1, -1, 1).to(g4.dtype)
    view = dests["weight"].view(n, k, v, d)
    if not accumulate:
        view.zero_()
    view.scatter_add_(2, ids.view(n, 1, -1, 1).expand(n, k, ids.shape[1], d), g4.to(view.dtype))


register(nn.Embedding, LayerRule(("weight",), _supports, _compute))
