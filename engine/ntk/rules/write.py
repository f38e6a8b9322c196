"""Writing per-sample gradients into Jacobian column views, shared by the rule families."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bmm_into", "outer_into", "scaled", "store"]

# Each bmm block's temporary result stays around this size so it is written and
# read back from cache rather than memory before landing in the Jacobian.
_BMM_BLOCK_BYTES = 4 << 20


def store(dest: Tensor, value: Tensor, accumulate: bool) -> None:
    if accumulate:
        dest.add_(value.reshape(dest.shape))
    else:
        dest.copy_(value.reshape(dest.shape))


def scaled(g: Tensor, scale: Tensor | None) -> Tensor:
    """g (n, K, C, ...) times scale (C,) along dim 2 (the output's dim 1)."""
    if scale is None:
        return g
    return g * scale.view(1, 1, -1, *([1] * (g.dim() - 3)))


def bmm_into(dest: Tensor, lhs: Tensor, rhs: Tensor, accumulate: bool, scale: Tensor | None = None) -> None:
    """``dest[n] (K, M·Q) <- diag(scale) · lhs[n] (K·M, L) @ rhs[n] (L, Q)`` for every sample n.

    When dest holds these columns alone (contiguous), the products land in it directly, a
    block of samples at a time, with the row scale applied to the smaller of lhs and the
    product. Otherwise dest is a strided column slice of the Jacobian, which bmm cannot write
    into (its rows for different k are P apart, not M·Q), so sample blocks go through a small
    buffer that stays in cache; the row scale (M,) rides along with that copy for free.
    """
    n, km, inner = lhs.shape
    k = dest.shape[1]
    q = rhs.shape[2]
    per_sample = km * q * lhs.element_size()
    block = max(1, min(n, _BMM_BLOCK_BYTES // max(per_sample, 1)))
    s4 = None if scale is None else scale.view(1, 1, -1, 1)
    direct = dest.is_contiguous() and not (accumulate and s4 is not None and inner > q)
    if direct:
        d3 = dest.view(n, km, q)
        for s in range(0, n, block):
            e = min(n, s + block)
            lb = lhs[s:e]
            if s4 is not None and (accumulate or inner <= q):  # scale the smaller operand
                lb = (lb.view(e - s, k, km // k, inner) * s4).view(e - s, km, inner)
            if accumulate:
                d3[s:e].baddbmm_(lb, rhs[s:e])
                continue
            torch.bmm(lb, rhs[s:e], out=d3[s:e])
            if s4 is not None and inner > q:
                d3[s:e].view(e - s, k, km // k, q).mul_(s4)  # still in cache
        return
    buf = torch.empty((block, km, q), dtype=lhs.dtype, device=lhs.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        tmp = torch.bmm(lhs[s:e], rhs[s:e], out=buf[: e - s])
        if s4 is None:
            store(dest[s:e], tmp, accumulate)
            continue
        d4 = dest[s:e].view(e - s, k, km // k, q)
        t4 = tmp.view(e - s, k, km // k, q)
        if accumulate:
            d4.addcmul_(t4, s4)
        else:
            torch.mul(t4, s4, out=d4)


def outer_into(dest: Tensor, g: Tensor, a: Tensor, accumulate: bool) -> None:
    """``dest[n, k] <- g[n, k] ⊗ a[n]`` written in place: g (n, K, O), a (n, I)."""
    n, k, o = g.shape
    view = dest.view(n, k, o, a.shape[1])
    lhs, rhs = g.unsqueeze(-1), a[:, None, None, :]
    if accumulate:
        view.addcmul_(lhs, rhs)
    else:
        torch.mul(lhs, rhs, out=view)
