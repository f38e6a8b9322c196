"""One layer rule against torch.func on one layer: per-sample gradients for random output
gradients g, accumulation, a borrowed scale, output-channel chunks and the closed-form Gram."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from engine.ntk.contract import contract
from engine.ntk.kinds import KernelKind
from engine.ntk.rules import rule_for
from tests._tolerance import assert_close_to_torch
from tests.seeding import seeded

K = 3  # outputs per sample


def _reference(module: nn.Module, x: torch.Tensor, g: torch.Tensor, attrs: list[str]) -> dict[str, torch.Tensor]:
    """{attr: (n, K, numel)}: ∂⟨g[n, k], y_n⟩/∂θ per sample by torch.func."""
    params = {a: getattr(module, a).detach() for a in attrs}

    def h(p, x1, g1):
        y = functional_call(module, p, (x1.unsqueeze(0),))[0]
        return (g1 * y.unsqueeze(0)).reshape(g1.shape[0], -1).sum(1)

    with torch.no_grad():
        jac = vmap(jacrev(h), in_dims=(None, 0, 0))(params, x, g)
    return {a: jac[a].reshape(x.shape[0], g.shape[1], -1) for a in attrs}


def _rule_columns(module, x, g, attrs, scale=None, accumulate_twice=False):
    rule = rule_for(module)
    with torch.no_grad():
        y = module(x)
    widths = [getattr(module, a).numel() for a in attrs]
    buf = torch.zeros(x.shape[0], g.shape[1], sum(widths), dtype=g.dtype)
    dests, c0 = {}, 0
    for a, w in zip(attrs, widths, strict=True):
        dests[a] = buf[:, :, c0:c0 + w]
        c0 += w
    assert rule.supports(module, x, y)
    rule.compute(module, x, g, dests, False, scale)
    if accumulate_twice:
        rule.compute(module, x, g, dests, True, scale)
    return {a: d for a, d in dests.items()}, buf


def check_rule(module: nn.Module, x: torch.Tensor, what: str) -> None:
    """Every check of one rule on ``module`` at inputs ``x`` (float32; the float64 copy is the reference)."""
    module = module.eval()
    attrs = [a for a, p in module.named_parameters(recurse=False) if p is not None]
    rule = rule_for(module)
    assert rule is not None, f"{what}: no rule"
    gen, seed = seeded()
    with torch.no_grad():
        y = module(x)
    g = torch.randn(x.shape[0], K, *y.shape[1:], generator=gen)
    m64 = copy.deepcopy(module).double()
    x64 = x.double() if x.is_floating_point() else x
    ref64 = _reference(m64, x64, g.double(), attrs)
    ref32 = _reference(module, x, g, attrs)
    got, _ = _rule_columns(module, x, g, attrs)
    for a in attrs:
        assert_close_to_torch(got[a], ref32[a], ref64[a], what=f"{what} {a} (seed {seed})")
    # accumulate=True adds to what is there
    twice, _ = _rule_columns(module, x, g, attrs, accumulate_twice=True)
    for a in attrs:
        assert_close_to_torch(twice[a], 2 * ref32[a], 2 * ref64[a], what=f"{what} {a} accumulated")
    # a borrowed scale along the output's dim 1 is the gradient g·scale
    if y.dim() >= 2:
        s = torch.rand(y.shape[1], generator=gen) + 0.5
        shape = (1, 1, -1, *([1] * (g.dim() - 3)))
        sc, _ = _rule_columns(module, x, g, attrs, scale=s)
        gs64 = g.double() * s.double().view(shape)
        ref_s64 = _reference(m64, x64, gs64, attrs)
        ref_s32 = _reference(module, x, g * s.view(shape), attrs)
        for a in attrs:
            assert_close_to_torch(sc[a], ref_s32[a], ref_s64[a], what=f"{what} {a} scaled")
    # output-channel chunks: g's channels o0:o1 give those channels' columns
    out_ch = rule.channels(module, x)
    if out_ch is not None:
        assert out_ch == y.shape[1], f"{what}: {out_ch} output channels for an output of shape {tuple(y.shape)}"
        o0, o1 = 1, max(2, out_ch - 1)
        gc = g[:, :, o0:o1]
        per = {a: getattr(module, a).numel() // out_ch for a in attrs}
        widths = [per[a] * (o1 - o0) for a in attrs]
        cb = torch.zeros(x.shape[0], K, sum(widths))
        dests, c0 = {}, 0
        for a, w in zip(attrs, widths, strict=True):
            dests[a] = cb[:, :, c0:c0 + w]
            c0 += w
        rule.compute(module, x, gc, dests, False, None)
        for a in attrs:
            torch.testing.assert_close(dests[a], got[a][:, :, o0 * per[a]:o1 * per[a]],
                                       msg=f"{what} {a}: channels {o0}:{o1}")
    # the closed-form Gram equals the Gram of the columns
    if rule.closed_form_for(module, x):
        for kind in KernelKind:
            gg = g.sum(1, keepdim=True) if kind is KernelKind.PNTK else g
            n, k = x.shape[0], gg.shape[1]
            shape = {KernelKind.DIAGONAL: (n, k, k), KernelKind.TRACED: (n, n)}.get(kind, (n * k, n * k))
            want, want64, have = torch.zeros(shape), torch.zeros(shape, dtype=torch.float64), torch.zeros(shape)
            cols = torch.cat([_rule_columns(module, x, gg, attrs)[0][a] for a in attrs], 2)
            cols64 = torch.cat([_rule_columns(m64, x64, gg.double(), attrs)[0][a] for a in attrs], 2)
            contract(want, cols, None, kind, False, None)
            contract(want64, cols64, None, kind, False, None)
            rule.closed_form(have, set(attrs), x, gg, x, gg, kind, False)
            assert_close_to_torch(have, want, want64, what=f"{what}: closed form, {kind.value}")
    # the workspace estimate is a non-negative element count
    assert rule.workspace_elements(module, x, y) >= 0
