"""Per-layer rules for the structured Jacobian backend.

A rule turns one call of a module into per-sample parameter gradients. It sees the
module's input activation ``a`` (shape ``(n, ...)``, sample dim first) and the
gradients ``g`` of K scalar outputs with respect to the module's output, stacked as
``(n, K, *output.shape[1:])`` (K = number of model outputs, or 1 for a projection).
For every requested parameter attribute it writes the per-sample gradients into a
destination view of shape ``(n, K, numel)`` (columns of the Jacobian, rows of the
chunk), overwriting or accumulating.

This is valid only because samples are independent (BatchNorm in eval mode), so the
gradient of the summed output ``Σ_n f_c(x_n)`` with respect to the module's output,
restricted to row n, is the gradient of ``f_c(x_n)`` alone.

To add a layer type: write ``supports`` (shape checks for one call) and ``compute``,
and ``register(ModuleType, LayerRule(...))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .pairs import PairSupport, conv_geometry, conv_operands, linear_geometry, linear_operands

__all__ = ["LayerRule", "is_batch_dependent", "register", "rule_for"]

# Each bmm block's temporary result stays around this size so it is written and
# read back from cache rather than memory before landing in the Jacobian.
_BMM_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class LayerRule:
    """How to form per-sample gradients for one module type.

    params: parameter attributes the rule knows (a module owning any other
        parameter is handled by the fallback).
    supports: ``(module, a, y) -> bool``; False sends this module to the fallback
        (e.g. an unbatched input).
    compute: ``(module, a, g, dests, accumulate, scale) -> None`` with ``dests``
        mapping the requested attributes to ``(n, K, numel)`` views, ``accumulate``
        saying whether to add to what is there (a module called more than once), and
        ``scale`` None or a vector the true output gradient is ``g`` times, along the
        output's dim 1 (``g`` was borrowed from a following BatchNorm, see below).
    input_scale: for modules that are a per-channel affine map in eval mode
        (BatchNorm): ``module -> s`` with ∂y/∂x = diag(s) along dim 1. A module whose
        output feeds only such a module then needs no gradient of its own: it is
        the follower's times s, folded into the per-sample product.
    pairs: for a layer applying one weight at T positions, its spatial-pair operands and
        geometry (engine/ntk/pairs.py): its Gram block without forming its columns.
    """

    params: tuple[str, ...]
    supports: Callable[[nn.Module, Tensor, Tensor], bool]
    compute: Callable[[nn.Module, Tensor, Tensor, Mapping[str, Tensor], bool, Tensor | None], None]
    input_scale: Callable[[nn.Module], Tensor] | None = None
    pairs: PairSupport | None = None


_RULES: dict[type, LayerRule] = {}


def register(module_type: type, rule: LayerRule) -> None:
    """Register ``rule`` for modules of exactly ``module_type`` (or subclasses that keep its forward)."""
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``, or None when it needs the fallback.

    A subclass only inherits a rule if it does not override ``forward``: a
    weight-standardised conv, say, is a Conv2d whose weight is transformed first.
    """
    cls = type(module)
    rule = _RULES.get(cls)
    if rule is not None:
        return rule
    for base in cls.__mro__[1:]:
        rule = _RULES.get(base)
        if rule is not None and cls.forward is base.forward:
            return rule
    return None


# --------------------------------------------------------------------------- writing


def _store(dest: Tensor, value: Tensor, accumulate: bool) -> None:
    if accumulate:
        dest.add_(value.reshape(dest.shape))
    else:
        dest.copy_(value.reshape(dest.shape))


def _scaled(g: Tensor, scale: Tensor | None) -> Tensor:
    """g (n, K, C, ...) times scale (C,) along dim 2 (the output's dim 1)."""
    if scale is None:
        return g
    return g * scale.view(1, 1, -1, *([1] * (g.dim() - 3)))


def _bmm_into(dest: Tensor, lhs: Tensor, rhs: Tensor, accumulate: bool, scale: Tensor | None = None) -> None:
    """``dest[n] (K, M·Q) <- diag(scale) · lhs[n] (K·M, L) @ rhs[n] (L, Q)`` for every sample n.

    dest is a strided column slice of the Jacobian, which bmm cannot write into
    directly (its rows for different k are P apart, not M·Q), so sample blocks go
    through a small buffer that stays in cache; the row scale (M,) rides along
    with that copy for free.
    """
    n, km, _ = lhs.shape
    k = dest.shape[1]
    q = rhs.shape[2]
    per_sample = km * q * lhs.element_size()
    block = max(1, min(n, _BMM_BLOCK_BYTES // max(per_sample, 1)))
    buf = torch.empty((block, km, q), dtype=lhs.dtype, device=lhs.device)
    s4 = None if scale is None else scale.view(1, 1, -1, 1)
    for s in range(0, n, block):
        e = min(n, s + block)
        tmp = torch.bmm(lhs[s:e], rhs[s:e], out=buf[: e - s])
        if s4 is None:
            _store(dest[s:e], tmp, accumulate)
            continue
        d4 = dest[s:e].view(e - s, k, km // k, q)
        t4 = tmp.view(e - s, k, km // k, q)
        if accumulate:
            d4.addcmul_(t4, s4)
        else:
            torch.mul(t4, s4, out=d4)


def _outer_into(dest: Tensor, g: Tensor, a: Tensor, accumulate: bool) -> None:
    """``dest[n, k] <- g[n, k] ⊗ a[n]`` written in place: g (n, K, O), a (n, I)."""
    n, k, o = g.shape
    view = dest.view(n, k, o, a.shape[1])
    lhs, rhs = g.unsqueeze(-1), a[:, None, None, :]
    if accumulate:
        view.addcmul_(lhs, rhs)
    else:
        torch.mul(lhs, rhs, out=view)


# --------------------------------------------------------------------------- Linear


def _linear_supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    return a.dim() >= 2


def _linear_compute(
    m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool, scale: Tensor | None
) -> None:
    g = _scaled(g, scale)
    n, k = g.shape[:2]
    if a.dim() == 2:
        if "weight" in dests:
            _outer_into(dests["weight"], g, a, accumulate)
        if "bias" in dests:
            _store(dests["bias"], g, accumulate)
        return
    # Extra dims (tokens, positions) share the weight: sum their contributions.
    a3 = a.reshape(n, -1, a.shape[-1])  # (n, T, I)
    g4 = g.reshape(n, k, a3.shape[1], g.shape[-1])  # (n, K, T, O)
    if "weight" in dests:
        lhs = g4.transpose(2, 3).reshape(n, k * g.shape[-1], a3.shape[1])  # (n, K·O, T)
        _bmm_into(dests["weight"], lhs, a3, accumulate)
    if "bias" in dests:
        _store(dests["bias"], g4.sum(2), accumulate)


register(
    nn.Linear,
    LayerRule(("weight", "bias"), _linear_supports, _linear_compute,
              pairs=PairSupport(linear_operands, linear_geometry)),
)


# --------------------------------------------------------------------------- Conv


def _conv_patches(m: nn.Module, a: Tensor, spatial: int) -> Tensor:
    """Unfolded input patches (n, C_in·∏kernel, L) for a 1-D or 2-D conv."""
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        # Mirror _conv_forward: explicit padding (non-zero modes, or 'same' which may
        # be asymmetric), then a padding-free conv.
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * spatial
    else:
        padding = tuple(m.padding)
    kernel, stride, dilation = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
    if spatial == 1:
        a = a.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)


def _conv_supports(spatial: int) -> Callable[[nn.Module, Tensor, Tensor], bool]:
    def supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
        return a.dim() == spatial + 2 and y.dim() == spatial + 2

    return supports


def _conv_compute(spatial: int):
    def compute(
        m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool, scale: Tensor | None
    ) -> None:
        n, k, c_out = g.shape[:3]
        g3 = g.reshape(n, k, c_out, -1)  # (n, K, C_out, L)
        if "weight" in dests:
            patches = _conv_patches(m, a, spatial)  # (n, C_in·kk, L)
            if patches.shape[2] != g3.shape[3]:
                raise RuntimeError(f"conv rule: {patches.shape[2]} patches for {g3.shape[3]} outputs in {m}")
            groups = m.groups
            if groups == 1:
                lhs = g3.reshape(n, k * c_out, -1)
                _bmm_into(dests["weight"], lhs, patches.transpose(1, 2), accumulate, scale)
            else:
                # Block-diagonal weight: group j's outputs only see group j's input channels.
                ci = patches.shape[1] // groups
                co = c_out // groups
                p4 = patches.view(n, groups, ci, -1)  # (n, G, ci·kk, L)
                g5 = _scaled(g3, scale).view(n, k, groups, co, -1)  # (n, K, G, co, L)
                w = torch.einsum("nkgol,ngil->nkgoi", g5, p4)
                _store(dests["weight"], w, accumulate)
        if "bias" in dests:
            _store(dests["bias"], _scaled(g3.sum(3), scale), accumulate)

    return compute


_CONV_PAIRS = PairSupport(conv_operands, conv_geometry)
register(nn.Conv2d, LayerRule(("weight", "bias"), _conv_supports(2), _conv_compute(2), pairs=_CONV_PAIRS))
register(nn.Conv1d, LayerRule(("weight", "bias"), _conv_supports(1), _conv_compute(1), pairs=_CONV_PAIRS))


# --------------------------------------------------------------------------- norms


def _norm_store(xhat: Tensor, g: Tensor, lead: int, width: int, dests: Mapping[str, Tensor], accumulate: bool) -> None:
    """Store dweight = Σ g·x̂ and dbias = Σ g over all dims except the parameter's.

    xhat: (n, R, width, S) after reshape (R = dims before the parameter's, S = after);
    g: (n, K, R, width, S).
    """
    n, k = g.shape[:2]
    g5 = g.reshape(n, k, lead, width, -1)
    if "weight" in dests:
        x4 = xhat.reshape(n, 1, lead, width, -1)
        _store(dests["weight"], (g5 * x4).sum(dim=(2, 4)), accumulate)
    if "bias" in dests:
        _store(dests["bias"], g5.sum(dim=(2, 4)), accumulate)


def _bn_supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    return not m.training and m.running_mean is not None and a.dim() >= 2


def _bn_compute(
    m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool, scale: Tensor | None
) -> None:
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    _norm_store(xhat, _scaled(g, scale), 1, a.shape[1], dests, accumulate)


def _bn_input_scale(m: nn.Module) -> Tensor:
    # Eval-mode BatchNorm is y = (x − μ)·γ/σ + β, so ∂y/∂x = γ/σ per channel.
    s = torch.rsqrt(m.running_var + m.eps)
    return s if m.weight is None else s * m.weight.detach()


for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register(_bn, LayerRule(("weight", "bias"), _bn_supports, _bn_compute, _bn_input_scale))


def _ln_supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    return a.dim() > len(m.normalized_shape)


def _ln_compute(
    m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool, scale: Tensor | None
) -> None:
    g = _scaled(g, scale)
    xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    width = 1
    for d in m.normalized_shape:
        width *= d
    lead = a[0].numel() // width
    _norm_store(xhat, g, lead, width, dests, accumulate)


register(nn.LayerNorm, LayerRule(("weight", "bias"), _ln_supports, _ln_compute))


def _gn_supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    return a.dim() >= 2


def _gn_compute(
    m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool, scale: Tensor | None
) -> None:
    g = _scaled(g, scale)
    xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
    _norm_store(xhat, g, 1, a.shape[1], dests, accumulate)


register(nn.GroupNorm, LayerRule(("weight", "bias"), _gn_supports, _gn_compute))


def is_batch_dependent(module: nn.Module) -> bool:
    """True for a BatchNorm that normalises with batch statistics even in eval mode."""
    return isinstance(module, _BatchNorm) and (not module.track_running_stats or module.running_mean is None)


# --------------------------------------------------------------------------- Embedding


def _emb_supports(m: nn.Module, a: Tensor, y: Tensor) -> bool:
    # max_norm renormalises the weight in place during the forward, and
    # scale_grad_by_freq rescales the gradient by batch counts: both are left to the fallback.
    return m.max_norm is None and not m.scale_grad_by_freq and not a.is_floating_point() and a.dim() >= 1


def _emb_compute(
    m: nn.Module, a: Tensor, g: Tensor, dests: Mapping[str, Tensor], accumulate: bool, scale: Tensor | None
) -> None:
    # Row v of the weight gets the sum of the output gradients of the tokens equal to v.
    if "weight" not in dests:
        return
    n, k = g.shape[:2]
    v, d = m.weight.shape
    ids = a.reshape(n, -1)
    g4 = _scaled(g, scale).reshape(n, k, ids.shape[1], d)
    if m.padding_idx is not None:
        g4 = g4 * (ids != m.padding_idx).view(n, 1, -1, 1).to(g4.dtype)
    view = dests["weight"].view(n, k, v, d)
    if not accumulate:
        view.zero_()
    view.scatter_add_(2, ids.view(n, 1, -1, 1).expand(n, k, ids.shape[1], d), g4.to(view.dtype))


register(nn.Embedding, LayerRule(("weight",), _emb_supports, _emb_compute))
