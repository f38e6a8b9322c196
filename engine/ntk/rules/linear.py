"""nn.Linear: outer products on (n, I) inputs, a batched product over the extra dims (tokens,
positions) otherwise, and the closed-form Gram ⟨g_a ⊗ a_a, g_b ⊗ a_b⟩ = (g_a·g_b)(a_a·a_b)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..kinds import KernelKind
from ..pairs import PairSupport, linear_geometry, linear_operands
from . import LayerRule, register
from .write import bmm_into, outer_into, scaled, store


def _supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    return a.dim() >= 2


def _compute(m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool,
             scale: Tensor | None) -> None:
    g = scaled(g, scale)
    n, k = g.shape[:2]
    if a.dim() == 2:
        if "weight" in dests:
            outer_into(dests["weight"], g, a, accumulate)
        if "bias" in dests:
            store(dests["bias"], g, accumulate)
        return
    # Extra dims (tokens, positions) share the weight: sum their contributions.
    a3 = a.reshape(n, -1, a.shape[-1])  # (n, T, I)
    g4 = g.reshape(n, k, a3.shape[1], g.shape[-1])  # (n, K, T, O)
    if "weight" in dests:
        lhs = g4.transpose(2, 3).reshape(n, k * g.shape[-1], a3.shape[1])  # (n, K·O, T)
        bmm_into(dests["weight"], lhs, a3, accumulate)
    if "bias" in dests:
        store(dests["bias"], g4.sum(2), accumulate)


def _closed_form(out: Tensor, attrs: set[str], aa: Tensor, ga: Tensor, ab: Tensor, gb: Tensor,
                 kind: KernelKind, bf16: bool) -> None:
    """The contribution of a Linear on (n, I) inputs: (g_a·g_b)(a_a·a_b) for the weight, g_a·g_b for the bias."""
    aa, ab = aa.to(ga.dtype), ab.to(gb.dtype)
    if bf16:
        # Same rounding as the columns would get; closed forms are cheap, so multiply in float32.
        ga, gb, aa, ab = (x.to(torch.bfloat16).to(out.dtype) for x in (ga, gb, aa, ab))
    w = 1.0 if "weight" in attrs else 0.0
    b = 1.0 if "bias" in attrs else 0.0
    na, k, o = ga.shape
    if kind is KernelKind.DIAGONAL:
        s = (aa * aa).sum(1) * w + b
        out.add_(torch.bmm(ga, ga.transpose(1, 2)) * s.view(-1, 1, 1))
        return
    s = (aa @ ab.T) * w + b  # (na, nb)
    if kind in (KernelKind.TRACED,):
        out.add_((ga.reshape(na, k * o) @ gb.reshape(-1, k * o).T) * s)
    else:
        gg = (ga.reshape(na * k, o) @ gb.reshape(-1, o).T).view(na, k, -1, k)
        out.view(na, k, -1, k).add_(gg * s[:, None, :, None])


def _out_channels(m: nn.Module, a: Tensor | None) -> int | None:
    # On (n, L, d) tokens the output's dim 1 is L, not the features: those calls are not split.
    return m.out_features if a is None or a.dim() == 2 else None


register(nn.Linear, LayerRule(("weight", "bias"), _supports, _compute,
                              out_channels=_out_channels,
                              closed_form=_closed_form, closed_form_when=lambda m, a: a.dim() == 2,
                              pairs=PairSupport(linear_operands, linear_geometry)))
