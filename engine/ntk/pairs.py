"""The spatial-pair Gram: a weight-sharing layer's kernel block without its Jacobian columns.

A layer that applies one weight at T positions (a convolution, or a Linear on (n, L, d)
inputs) has per-sample weight gradients ∂f_c(x_i)/∂W = Σ_t g_ic[t] ⊗ a_i[t], with a_i[t] the
unfolded input at position t (D values per group) and g_ic[t] the gradient of output c with
respect to the layer's output there (co values per group). Their inner product is

    ⟨∂f_ic/∂W, ∂f_jd/∂W⟩ = Σ_{t,s} (a_i[t]·a_j[s]) (g_ic[t]·g_jd[s]),

and the bias adds Σ_{t,s} g_ic[t]·g_jd[s], so weight and bias together use (A + 1) in place
of A. Two Grams (A over the D inputs, Γ over the co outputs) and one T×T weighted sum cost
about T²·(D + K²·co) per pair of samples, against K·co·D per sample to form the columns and
(n·K)²·co·D for their Gram: cheaper when T² is small next to D·co (late convolutions on
small maps), dearer on early, large maps (Bu et al.'s 2T² ≤ p·d rule; neural-tangents
calls it structured derivatives). The Linear closed form on (n, d) inputs is its T = 1 case.

Operands (see :func:`conv_operands`, :func:`linear_operands`):

* ``p``: unfolded inputs (n, G, D, T): G groups, D = in_channels/G · ∏kernel, T positions;
* ``g``: output gradients (n, K, G, co, T), already multiplied by any borrowed scale.

Kernels (rows ``i·K + c``, as everywhere in :mod:`engine.ntk`): ``full`` and ``pntk``
(na·K, nb·K) (a pNTK has K = 1: the projected output's gradient); ``traced`` (na, nb),
Σ_c of the K × K blocks; ``diagonal`` (n, K, K), one sample with itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Geometry", "PairSupport", "conv_geometry", "conv_operands", "linear_geometry", "linear_operands",
           "pair_gram", "round_operands"]

# Bound on one product's intermediate (Γ, the output-gradient Gram, and A): above it, the
# samples of a tile are taken in sub-blocks.
WORKSPACE_BYTES = 64 << 20
KINDS = ("full", "traced", "diagonal", "pntk")


# --------------------------------------------------------------------------- operands


@dataclass(frozen=True)
class Geometry:
    """Shape of one call of a weight-sharing layer, per sample: ``groups`` groups, each with
    ``d`` unfolded inputs and ``co`` outputs per position, at ``t`` positions."""

    groups: int
    d: int
    co: int
    t: int

    @property
    def forward_macs(self) -> int:
        return self.groups * self.d * self.co * self.t

    @property
    def weight_numel(self) -> int:
        return self.groups * self.d * self.co


@dataclass(frozen=True)
class PairSupport:
    """What a layer rule offers for spatial pairs: its operands and its per-call geometry."""

    operands: Callable[[nn.Module, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]
    geometry: Callable[[nn.Module, Tensor, Tensor], Geometry]


def conv_geometry(m: nn.Module, a: Tensor, y: Tensor) -> Geometry:
    """A conv call's geometry from its input a (n, C_in, *S) and output y (n, C_out, *S_out)."""
    g = m.groups
    return Geometry(g, m.in_channels // g * math.prod(m.kernel_size), m.out_channels // g, math.prod(y.shape[2:]))


def linear_geometry(m: nn.Module, a: Tensor, y: Tensor) -> Geometry:
    """A Linear call's geometry: T = the positions between the sample and feature dims (1 for (n, d))."""
    return Geometry(1, m.in_features, m.out_features, math.prod(a.shape[1:-1]))



def conv_patches(m: nn.Module, a: Tensor, spatial: int) -> Tensor:
    """Unfolded input patches (n, C_in·∏kernel, L) of a 1-D or 2-D conv ``m`` on its input ``a``.

    The same values as ``F.unfold``, gathered by one copy of a strided view of the padded input:
    ``F.unfold`` on the CPU copies element by element (15x slower on a 32×32 map with 16 channels).
    """
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        # As the conv's own forward: explicit (possibly asymmetric) padding, then none.
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
    elif any(m.padding):
        a = F.pad(a, [q for q in reversed(m.padding) for _ in range(2)])
    n, c = a.shape[:2]
    size, kernel = a.shape[2:], tuple(m.kernel_size)
    stride, dilation = tuple(m.stride), tuple(m.dilation)
    out = [(s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(size, kernel, stride, dilation, strict=True)]
    if min(out) <= 0:
        raise RuntimeError(f"conv patches: input {tuple(a.shape)} (padded) is smaller than the kernel of {m}")
    st = a.stride()
    view = a.as_strided((n, c, *kernel, *out), (st[0], st[1], *(st[2 + i] * dilation[i] for i in range(spatial)),
                                                *(st[2 + i] * stride[i] for i in range(spatial))))
    return view.reshape(n, c * math.prod(kernel), math.prod(out))


def conv_operands(m: nn.Module, a: Tensor, g: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(p, g) of a Conv1d/Conv2d call: input a (n, C_in, *S), output gradients g (n, K, C_out, *S_out).

    ``scale`` (C_out,): the true output gradient is g times it along the channels (a gradient
    borrowed from a following BatchNorm).
    """
    spatial = a.dim() - 2
    p = conv_patches(m, a, spatial)  # (n, C_in·kk, T)
    n, k, c_out = g.shape[:3]
    groups = m.groups
    g5 = g.reshape(n, k, groups, c_out // groups, -1)
    if p.shape[2] != g5.shape[4]:
        raise RuntimeError(f"spatial pairs: {p.shape[2]} patches for {g5.shape[4]} output positions in {m}")
    if scale is not None:
        g5 = g5 * scale.view(1, 1, groups, -1, 1)
    return p.view(n, groups, -1, p.shape[2]), g5


def linear_operands(m: nn.Module, a: Tensor, g: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(p, g) of a Linear call: input a (n, *L, d), output gradients g (n, K, *L, O); T = ∏L (1 for (n, d))."""
    n, k = g.shape[:2]
    if scale is not None:  # along the output's dim 1 (g's dim 2)
        g = g * scale.view(1, 1, -1, *([1] * (g.dim() - 3)))
    a3 = a.reshape(n, -1, a.shape[-1])  # (n, T, d)
    g4 = g.reshape(n, k, a3.shape[1], g.shape[-1])  # (n, K, T, O)
    return a3.transpose(1, 2).unsqueeze(1), g4.transpose(2, 3).unsqueeze(2)


def round_operands(p: Tensor, g: Tensor, mode: str | None) -> tuple[Tensor, Tensor]:
    """The operands as the products will read them: ``None`` as they are, ``"emulate"`` rounded
    to bfloat16 and back (products in float32), ``"native"`` in bfloat16 (float32 accumulation)."""
    if mode is None:
        return p, g
    if mode == "native":
        return p.to(torch.bfloat16), g.to(torch.bfloat16)
    return p.to(torch.bfloat16).to(p.dtype), g.to(torch.bfloat16).to(g.dtype)


# --------------------------------------------------------------------------- products


def _bmm(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """x (B, r, w) @ y (B, q, w)ᵀ, returned in ``dtype`` (bfloat16 operands accumulate in float32
    inside the BLAS; the result is rounded once)."""
    return torch.bmm(x, y.transpose(1, 2)).to(dtype)


def _rows_p(p: Tensor) -> Tensor:
    """(n, G, D, T) -> (G, n·T, D)."""
    n, groups, d, t = p.shape
    return p.permute(1, 0, 3, 2).reshape(groups, n * t, d)


def _rows_g(g: Tensor, traced: bool) -> Tensor:
    """(n, K, G, co, T) -> (G, n·T·K, co), or (G, n·T, K·co) for the traced kernel."""
    n, k, groups, co, t = g.shape
    g = g.permute(2, 0, 4, 1, 3)  # (G, n, T, K, co)
    return g.reshape(groups, n * t, k * co) if traced else g.reshape(groups, n * t * k, co)


def two_stage(kind: str, k: int, t: int) -> bool:
    """Whether the full kernel's pairs go in two stages: M_j = A_ij g_j over s (K·T²·co per pair),
    then g_i · M_j over (t, o) (K²·T·co), instead of Γ's K²·T²·co: fewer multiply-adds once
    K + T < K·T."""
    return kind in ("full", "pntk") and k + t < k * t


def _two_stages(out: Tensor, pa: Tensor, ga: Tensor, pb: Tensor, gb: Tensor, bias: bool) -> None:
    """out (na·K × nb·K) += Σ_{t,s} A[i,t,j,s] g_ic[t]·g_jd[s] without forming Γ."""
    na, k, groups, co, t = ga.shape
    nb = gb.shape[0]
    dt = out.dtype
    amat = _bmm(_rows_p(pa), _rows_p(pb), dt)  # (G, na·T, nb·T)
    if bias:
        amat += 1.0
    lhs = amat.view(groups, na * t, nb, t).permute(0, 2, 1, 3).reshape(groups * nb, na * t, t)
    rhs = gb.permute(2, 0, 4, 1, 3).reshape(groups * nb, t, k * co).to(dt)  # (G·nb, T_s, (d, o))
    m = torch.bmm(lhs, rhs)  # (G·nb, na·T_t, (d, o)): M[j, i, t, d, o]
    m = m.view(groups, nb, na, t, k, co).permute(0, 2, 3, 5, 1, 4).reshape(groups * na, t * co, nb * k)
    gl = ga.permute(2, 0, 1, 4, 3).reshape(groups * na, k, t * co).to(dt)  # (G·na, c, (t, o))
    out.view(na, k, nb, k).add_(torch.bmm(gl, m).view(groups, na, k, nb, k).sum(0))


def _block(out: Tensor, kind: str, pa: Tensor, ga: Tensor, pb: Tensor, gb: Tensor, weight: bool, bias: bool) -> None:
    """out (full: na·K × nb·K, traced: na × nb) += the pair sums of one block pair."""
    na, k, groups, _, t = ga.shape
    nb = gb.shape[0]
    dt = out.dtype
    traced = kind == "traced"
    if weight and two_stage(kind, k, t):
        _two_stages(out, pa, ga, pb, gb, bias)
        return
    gam = _bmm(_rows_g(ga, traced), _rows_g(gb, traced), dt)  # (G, na·T[·K], nb·T[·K])
    if weight:
        amat = _bmm(_rows_p(pa), _rows_p(pb), dt)  # (G, na·T, nb·T)
        if bias:
            amat += 1.0
    if traced:
        prod = gam.mul_(amat) if weight else gam
        out.add_(prod.view(groups, na, t, nb, t).sum(dim=(0, 2, 4)))
        return
    g7 = gam.view(groups, na, t, k, nb, t, k)
    prod = g7.mul_(amat.view(groups, na, t, 1, nb, t, 1)) if weight else g7
    out.view(na, k, nb, k).add_(prod.sum(dim=(0, 2, 5)))


def _diagonal(out: Tensor, p: Tensor, g: Tensor, weight: bool, bias: bool) -> None:
    """out (n, K, K) += each sample's pair sums with itself."""
    n, k, groups, co, t = g.shape
    dt = out.dtype
    gr = g.permute(0, 2, 4, 1, 3).reshape(n * groups, t * k, co)  # (n·G, T·K, co)
    gam = _bmm(gr, gr, dt).view(n, groups, t, k, t, k)
    if weight:
        pr = p.transpose(2, 3).reshape(n * groups, t, -1)  # (n·G, T, D)
        amat = _bmm(pr, pr, dt).view(n, groups, t, 1, t, 1)
        gam.mul_(amat + 1.0 if bias else amat)
    out.add_(gam.sum(dim=(1, 2, 4)))


def _bias_only(out: Tensor, kind: str, ga: Tensor, gb: Tensor | None) -> None:
    """The bias alone: Σ_t g_i[t] · Σ_s g_j[s], a T = 1 Gram of the summed gradients."""
    sa = ga.sum(-1).flatten(2)  # (na, K, C_out)
    dt = out.dtype
    if kind == "diagonal":
        out.add_(torch.bmm(sa, sa.transpose(1, 2)).to(dt))
        return
    sb = sa if gb is None else gb.sum(-1).flatten(2)
    if kind == "traced":
        out.add_((sa.reshape(sa.shape[0], -1) @ sb.reshape(sb.shape[0], -1).T).to(dt))
    else:
        out.add_((sa.reshape(-1, sa.shape[2]) @ sb.reshape(-1, sb.shape[2]).T).to(dt))


def pair_gram(out: Tensor, kind: str, pa: Tensor, ga: Tensor, pb: Tensor | None = None, gb: Tensor | None = None,
              *, weight: bool = True, bias: bool = False, mode: str | None = None,
              workspace_bytes: int = WORKSPACE_BYTES) -> Tensor:
    """Add one layer's kernel block for samples a × b to ``out`` by spatial pairs; returns ``out``.

    ``pa``, ``ga`` (and ``pb``, ``gb``): operands of the two blocks (module docstring);
    ``pb = gb = None``: b is a, a diagonal tile of a symmetric kernel, of which only the upper
    triangle is computed (the caller mirrors it); always None for ``kind="diagonal"``.
    ``weight`` / ``bias``: which of the layer's parameters the block counts. ``mode``: None,
    or bfloat16 as in :func:`round_operands` (Grams accumulate in float32 either way; ``out``
    is float32 or float64). ``workspace_bytes`` bounds each intermediate Gram: larger tiles
    are taken in sample sub-blocks.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if (pb is None) != (gb is None) or (kind == "diagonal" and pb is not None):
        raise ValueError("pass both pb and gb (a cross tile) or neither (b is a); a diagonal kernel takes neither")
    pa, ga = round_operands(pa, ga, mode)
    if pb is not None:
        pb, gb = round_operands(pb, gb, mode)
    if not weight:
        if bias:
            _bias_only(out, kind, ga, gb)
        return out
    na, k, groups, co, t = ga.shape
    # Elements of the largest intermediate per pair of samples (Γ of the full kernel is K² per T²;
    # the two-stage M is T·K·co, held twice while it is rearranged).
    per_pair = groups * t * t * (1 if kind == "traced" else k * k) * max(out.element_size(), 4)
    if two_stage(kind, k, t):
        per_pair = groups * t * max(t, 2 * k * co) * max(out.element_size(), 4)
    if kind == "diagonal":
        step = max(1, workspace_bytes // per_pair)
        for r0 in range(0, na, step):
            _diagonal(out[r0:r0 + step], pa[r0:r0 + step], ga[r0:r0 + step], weight, bias)
        return out
    sym = pb is None
    pb, gb = (pa, ga) if sym else (pb, gb)
    nb = gb.shape[0]
    cap = max(1, workspace_bytes // per_pair)  # sample pairs per sub-block product
    cols = min(nb, cap)
    rows = max(1, cap // cols)
    if sym:  # row strips of at most a quarter: about 5/8 of the square is computed, not all of it
        rows = min(rows, -(-na // 4))
    r = 1 if kind == "traced" else k
    for r0 in range(0, na, rows):
        r1 = min(na, r0 + rows)
        for c0 in range(r0 if sym else 0, nb, cols):  # symmetric: blocks at and right of the diagonal
            c1 = min(nb, c0 + cols)
            _block(out[r0 * r:r1 * r, c0 * r:c1 * r], kind, pa[r0:r1], ga[r0:r1], pb[c0:c1], gb[c0:c1],
                   weight, bias)
    return out


def pair_macs(kind: str, na: int, nb: int, k: int, groups: int, d: int, co: int, t: int) -> int:
    """Multiply-adds of :func:`pair_gram` for one tile (d, co per group; nb = na for a diagonal kernel)."""
    pairs = na if kind == "diagonal" else na * nb
    if two_stage(kind, k, t):
        return pairs * groups * t * (t * d + k * t * co + k * k * co)
    if kind == "traced":
        return pairs * groups * t * t * (d + k * co + 1)
    return pairs * groups * t * t * (d + k * k * (co + 1))

