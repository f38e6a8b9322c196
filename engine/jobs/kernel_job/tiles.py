"""One tile of a kernel job: from the model (recomputed), or from two stored Jacobian blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...ntk import entk, jacobian, num_outputs
from .plan import KernelKind


def jacobian_block(model: nn.Module, x: torch.Tensor, kind: KernelKind, c: int) -> torch.Tensor:
    """J of one block: ``(n·C, P)``, or ``(n, P)`` for the pNTK output Σ_c f_c / √C."""
    if kind is KernelKind.PNTK:
        v = torch.full((c,), 1.0 / math.sqrt(c), dtype=x.dtype, device=x.device)
        return jacobian(model, x, projection=v)
    return jacobian(model, x)


def symmetrised(h: torch.Tensor) -> torch.Tensor:
    """The diagonal tile of a symmetric kernel: exactly symmetric, from its upper triangle."""
    return torch.triu(h) + torch.triu(h, 1).T


def contract(ja: torch.Tensor, jb: torch.Tensor | None, kind: KernelKind, c: int,
             compute_dtype: torch.dtype) -> torch.Tensor:
    """The tile from two Jacobian blocks (``jb=None``: a diagonal tile, J_a J_aᵀ)."""
    same = jb is None
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    a = ja.to(compute_dtype)
    b = a if same else jb.to(compute_dtype)
    if kind is KernelKind.DIAGONAL:
        a3 = a.view(-1, c, a.shape[1])
        return torch.bmm(a3, a3.transpose(1, 2)).to(out_dtype).reshape(a3.shape[0], c * c)
    if kind is KernelKind.TRACED:
        a3 = a.view(-1, c, a.shape[1]).transpose(0, 1)
        b3 = b.view(-1, c, b.shape[1]).transpose(0, 1)
        h = torch.bmm(a3, b3.transpose(1, 2)).to(out_dtype).sum(0)
    else:
        h = torch.mm(a, b.T).to(out_dtype)
    return symmetrised(h) if same else h


def tile(model: nn.Module, xa: torch.Tensor, xb: torch.Tensor | None, kind: KernelKind,
         compute_dtype: torch.dtype, budget_bytes: int, contraction: str = "auto") -> torch.Tensor:
    """One tile of the kernel, straight from the model: ``(na·C, nb·C)``, ``(na, nb)`` or ``(na, C·C)``.

    ``xb=None`` is a diagonal tile of a symmetric kernel (and the only form of the diagonal kernel).

    float32 and bfloat16 tiles come from the one-pass engine (:func:`engine.ntk.entk`, a cross-kernel
    for ``xb``); float64 from float64 Jacobian blocks (the one-pass engine computes in the
    parameters' dtype). Nothing else in this package computes a tile from the model. ``contraction``:
    each layer's strategy in the one-pass engine (``auto`` | ``materialise`` | ``pairs``).
    """
    if compute_dtype == torch.float64:
        c = num_outputs(model, xa)
        ja = jacobian_block(model, xa, kind, c)
        jb = None if xb is None else jacobian_block(model, xb, kind, c)
        return contract(ja, jb, kind, c, compute_dtype)
    h = entk(model, xa, xb, kernel=kind.value, compute_dtype=compute_dtype, budget_bytes=budget_bytes,
             dtype=torch.float32, contraction=contraction)
    if kind is KernelKind.DIAGONAL:
        return h.reshape(len(xa), -1)
    return symmetrised(h) if xb is None else h
