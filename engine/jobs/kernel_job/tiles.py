"""One tile of a kernel job: from the model (recomputed), or from two stored Jacobian blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...ntk import entk
from ...ntk.contract import bf16_mode, symmetrize
from ...ntk.contract import contract as tile_products
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
    """The tile from two Jacobian blocks (``jb=None``: a diagonal tile, J_a J_aᵀ), by the tile products
    every front end uses (:func:`engine.ntk.contract.contract`, bfloat16 as in ``entk``).

    A block holds ``k`` rows per input (C, or 1 for the pNTK's projection), row ``n·k + c``.
    """
    same = jb is None
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    k = 1 if kind is KernelKind.PNTK else c
    a = ja.to(out_dtype).view(-1, k, ja.shape[1])
    b = None if same else jb.to(out_dtype).view(-1, k, jb.shape[1])
    na, nb = a.shape[0], a.shape[0] if same else b.shape[0]
    if kind is KernelKind.DIAGONAL:
        shape = (na, k, k)
    else:
        shape = (na, nb) if kind in (KernelKind.TRACED, KernelKind.PNTK) else (na * k, nb * k)
    out = torch.zeros(shape, dtype=out_dtype, device=ja.device)
    mode = bf16_mode(compute_dtype == torch.bfloat16, ja.device)
    tile_products(out, a, b, kind, same and kind is not KernelKind.DIAGONAL, mode)
    if kind is KernelKind.DIAGONAL:
        return symmetrize(out).reshape(na, k * k)
    return symmetrize(out) if same else out


def tile(model: nn.Module, xa: torch.Tensor, xb: torch.Tensor | None, kind: KernelKind,
         compute_dtype: torch.dtype, budget_bytes: int, contraction: str = "auto") -> torch.Tensor:
    """One tile of the kernel, straight from the model: ``(na·C, nb·C)``, ``(na, nb)`` or ``(na, C·C)``.

    ``xb=None`` is a diagonal tile of a symmetric kernel (and the only form of the diagonal kernel).
    ``budget_bytes``: entk's working memory for the tile (the job passes what its estimate set aside,
    :func:`.plan.recompute_working`).

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
