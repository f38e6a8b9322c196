"""nn.Conv1d / nn.Conv2d: per-sample weight gradients as a batched product of the output
gradients with the unfolded input patches (block-diagonal per group), bias as their sum."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..pairs import PairSupport, conv_geometry, conv_operands, conv_patches
from . import LayerRule, register, reused
from .write import bmm_into, scaled, store


def patches(m: nn.Module, a: Tensor, spatial: int) -> Tensor:
    """Unfolded input patches (n, C_in·∏kernel, L) for a 1-D or 2-D conv (once per input inside
    :func:`~engine.ntk.rules.reuse_workspace`: a layer formed a channel range at a time)."""
    return reused(m, a, lambda: conv_patches(m, a, spatial))


def _supports(spatial: int) -> Callable[[nn.Module, Tensor, Tensor], bool]:
    def supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
        return a.dim() == spatial + 2 and y.dim() == spatial + 2

    return supports


def _compute(spatial: int):
    def compute(m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool,
                scale: Tensor | None) -> None:
        n, k, c_out = g.shape[:3]
        g3 = g.reshape(n, k, c_out, -1)  # (n, K, C_out, L)
        if "weight" in dests:
            p = patches(m, a, spatial)  # (n, C_in·kk, L)
            if p.shape[2] != g3.shape[3]:
                raise RuntimeError(f"conv rule: {p.shape[2]} patches for {g3.shape[3]} outputs in {m}")
            groups = m.groups
            if groups == 1:
                lhs = g3.reshape(n, k * c_out, -1)
                bmm_into(dests["weight"], lhs, p.transpose(1, 2), accumulate, scale)
            else:
                # Block-diagonal weight: group j's outputs only see group j's input channels.
                ci = p.shape[1] // groups
                co = c_out // groups
                p4 = p.view(n, groups, ci, -1)  # (n, G, ci·kk, L)
                g5 = scaled(g3, scale).view(n, k, groups, co, -1)  # (n, K, G, co, L)
                w = torch.einsum("nkgol,ngil->nkgoi", g5, p4)
                store(dests["weight"], w, accumulate)
        if "bias" in dests:
            store(dests["bias"], scaled(g3.sum(3), scale), accumulate)

    return compute


def _out_channels(m: nn.Module, a: Tensor | None) -> int | None:
    # A grouped conv's channel range would cut across its block-diagonal weight layout.
    return m.out_channels if m.groups == 1 else None


def _workspace(m: nn.Module, a: Tensor, y: Tensor) -> int:
    return math.prod(int(d) for d in m.kernel_size) * a.numel()  # the unfolded patches


_PAIRS = PairSupport(conv_operands, conv_geometry)
for _cls, _spatial in ((nn.Conv2d, 2), (nn.Conv1d, 1)):
    register(_cls, LayerRule(("weight", "bias"), _supports(_spatial), _compute(_spatial),
                             out_channels=_out_channels, workspace=_workspace, pairs=_PAIRS))
