"""One tile of a kernel job: from the model (recomputed), or from two stored Jacobian blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...ntk import entk
from .plan import KernelKind


def projection(kind: KernelKind, c: int, x: torch.Tensor) -> torch.Tensor | None:
    """The output projection whose Jacobian a J block holds: Σ_c f_c / √C for the pNTK, else None (all C)."""
    if kind is KernelKind.PNTK:
        return torch.full((c,), 1.0 / math.sqrt(c), dtype=x.dtype, device=x.device)
    return None


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
    ``budget_bytes``: the working memory of the tile (engine.ntk.budget's meaning), not the process's.

    Every compute dtype goes through the one-pass engine (:func:`engine.ntk.entk`, a cross-kernel for
    ``xb``), which computes in the parameters' dtype: for float64 ``model`` and the inputs are the
    job's float64 copies, so the tile is float64 throughout. Nothing else in this package computes a
    tile from the model. ``contraction``: each layer's strategy in the one-pass engine (``auto`` |
    ``materialise`` | ``pairs``).
    """
    if compute_dtype == torch.float64:
        h = entk(model, xa, xb, kernel=kind.value, budget_bytes=budget_bytes, dtype=torch.float64,
                 contraction=contraction)
    else:
        h = entk(model, xa, xb, kernel=kind.value, compute_dtype=compute_dtype, budget_bytes=budget_bytes,
                 dtype=torch.float32, contraction=contraction)
    if kind is KernelKind.DIAGONAL:
        return h.reshape(len(xa), -1)
    return symmetrised(h) if xb is None else h
