"""Layer rules: per-sample parameter gradients of one layer family, in closed form.

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

One file per layer family (``linear``, ``conv``, ``norm``, ``embedding``). To add a layer
type: write its ``supports`` and ``compute`` (and what else of :class:`LayerRule` applies)
in a file here and ``register(ModuleType, LayerRule(...))``; the drivers
(:mod:`engine.ntk.jacobian`, :mod:`engine.ntk.onepass`) ask the rule, never the layer type.
Every parameter without a rule gets its columns from torch.func (:mod:`engine.ntk.fallback`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from torch import Tensor, nn

from ..pairs import PairSupport

__all__ = ["LayerRule", "is_batch_dependent", "register", "reuse_workspace", "reused", "rule_for"]


@dataclass(frozen=True)
class LayerRule:
    """How to form per-sample gradients for one module type, and what the drivers need to plan.

    params: parameter attributes the rule knows (a module owning any other
        parameter is handled by the fallback).
    supports: ``(module, a, y) -> bool``; False sends this module to the fallback
        (e.g. an unbatched input).
    compute: ``(module, a, g, dests, accumulate, scale) -> None`` with ``dests``
        mapping the requested attributes to ``(n, K, numel)`` views, ``accumulate``
        saying whether to add to what is there (a module called more than once), and
        ``scale`` None or a vector the true output gradient is ``g`` times, along the
        output's dim 1 (``g`` was borrowed from a following BatchNorm, see below).
        With ``g`` sliced to output channels ``o0:o1`` (and ``dests`` sized for them),
        a rule with ``out_channels`` writes just those channels' columns.
    input_scale: for modules that are a per-channel affine map in eval mode
        (BatchNorm): ``module -> s`` with ∂y/∂x = diag(s) along dim 1. A module whose
        output feeds only such a module then needs no gradient of its own: it is
        the follower's times s, folded into the per-sample product.
    out_channels: ``(module, a) -> int | None``: the output channels (the output's dim 1)
        along which every parameter's columns split evenly (weight rows, bias entries), so the
        driver may form a layer's columns a channel range at a time, for a call on input ``a``
        (``a=None``: the count if any call can be split); None: all at once.
    closed_form: the layer's kernel contribution without its columns, or None:
        ``(out, attrs, a_a, g_a, a_b, g_b, kind, bf16) -> None`` adds to the tile ``out`` the
        contribution of the parameter attributes ``attrs`` between the calls with inputs
        ``a_a``, ``a_b`` and output gradients ``g_a``, ``g_b`` (already scaled);
        ``kind``: a :class:`~engine.ntk.kinds.KernelKind`; ``bf16``: round the factors to
        bfloat16 first. ``closed_form_when(module, a) -> bool`` says for which inputs it applies.
    workspace: ``(module, a, y) -> int``: transient elements per sample of one call's
        ``compute`` (e.g. unfolded patches); default ``a.numel()``.
    pairs: for a layer applying one weight at T positions, its spatial-pair operands and
        geometry (engine/ntk/pairs.py): its Gram block without forming its columns.
    """

    params: tuple[str, ...]
    supports: Callable[[nn.Module, Tensor, Tensor], bool]
    compute: Callable[[nn.Module, Tensor, Tensor, Mapping[str, Tensor], bool, Tensor | None], None]
    input_scale: Callable[[nn.Module], Tensor] | None = None
    out_channels: Callable[[nn.Module, Tensor | None], int | None] | None = None
    closed_form: Callable[..., None] | None = None
    closed_form_when: Callable[[nn.Module, Tensor], bool] | None = None
    workspace: Callable[[nn.Module, Tensor, Tensor], int] | None = None
    pairs: PairSupport | None = None

    def channels(self, module: nn.Module, a: Tensor | None = None) -> int | None:
        return None if self.out_channels is None else self.out_channels(module, a)

    def closed_form_for(self, module: nn.Module, a: Tensor) -> bool:
        return self.closed_form is not None and (self.closed_form_when is None or self.closed_form_when(module, a))

    def workspace_elements(self, module: nn.Module, a: Tensor, y: Tensor) -> int:
        return a.numel() if self.workspace is None else self.workspace(module, a, y)


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


# Inside reuse_workspace(): the latest derived inputs (a conv's unfolded patches), newest first.
_REUSE: ContextVar[list | None] = ContextVar("rule_workspace_reuse", default=None)
_KEEP = 2  # a tile's two row blocks


@contextmanager
def reuse_workspace() -> Iterator[None]:
    """While open (a driver's tile), a rule's :func:`reused` workspace is kept for the last two
    (module, input) pairs, so a layer formed a channel range at a time derives it once per row
    block, not once per range. At most two layers' workspaces are held; the block memory estimate
    counts one per block."""
    token = _REUSE.set([])
    try:
        yield
    finally:
        _REUSE.reset(token)


def reused(module: nn.Module, a: Tensor, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, or its kept result for this module and this very input tensor."""
    kept = _REUSE.get()
    if kept is None:
        return make()
    for km, ka, kw in kept:
        if km is module and ka is a:
            return kw
    w = make()
    kept.insert(0, (module, a, w))
    del kept[_KEEP:]
    return w


# The families register themselves on import.
from . import conv, embedding, linear, norm  # noqa: E402, F401
from .norm import is_batch_dependent  # noqa: E402
