"""The spatial-pair Gram (engine/ntk/pairs.py) against torch.func, one layer family at a time.

Each case is one layer followed by a fixed random head, f(x) = R · tanh(layer(x)), so the output
gradients differ per sample. The truth is J64 J64ᵀ with J64 = vmap(jacrev) of f with respect to the
layer's parameters, in float64; plain torch's own answer is the same recipe in float32 (or J32
rounded to bfloat16 and multiplied in float32, for the bfloat16 modes). The pair Gram sums the same
products in another order, so its error may be FACTOR times plain torch's, with one unit of the
precision as floor (tests/_tolerance.py). Odd shapes, T = 1 (a 1×1 map, a Linear on (n, d)), groups
equal to the channel count; every kernel kind, cross tiles, symmetric tiles, weight and bias alone
and together, sample sub-blocks. Seeds are printed in every failure message.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from engine.ntk.gram import symmetrize
from engine.ntk.pairs import conv_operands, linear_operands, pair_gram
from tests._tolerance import assert_close_to_torch
from tests.seeding import seeded

FACTOR = 8.0
K = 3


class Head(nn.Module):
    """layer, then K outputs R · tanh(flatten)."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, g: torch.Generator):
        super().__init__()
        self.layer = layer
        with torch.no_grad():
            width = layer(x[:1]).numel()
        self.register_buffer("r", torch.randn(K, width, generator=g) / width ** 0.5)

    def forward(self, x):
        return torch.tanh(self.layer(x)).flatten(1) @ self.r.T


def _jacobian(model: Head, x: torch.Tensor, names) -> torch.Tensor:
    """(n, K, P) per-sample Jacobian of the layer's parameters ``names``."""
    params = {k: v.detach() for k, v in model.named_parameters() if k.split(".")[-1] in names}

    def single(p, x1):
        return functional_call(model, p, (x1.unsqueeze(0),))[0]

    jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
    return torch.cat([jac[k].reshape(x.shape[0], K, -1) for k in params], dim=2).detach()


def _grads(model: Head, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer input, output gradients (n, K, *y.shape[1:]))."""
    y = model.layer(x).detach()

    def head(y1):
        return torch.tanh(y1.unsqueeze(0)).flatten(1)[0] @ model.r.T

    return x, vmap(jacrev(head))(y)


def _kernels(j1: torch.Tensor, j2: torch.Tensor) -> dict[str, torch.Tensor]:
    n1, c, p = j1.shape
    n2 = j2.shape[0]
    full = j1.reshape(n1 * c, p) @ j2.reshape(n2 * c, p).T
    f4 = full.view(n1, c, n2, c)
    return {"full": full, "traced": f4.diagonal(dim1=1, dim2=3).sum(-1), "pntk": f4.sum((1, 3)) / c,
            "diagonal": torch.einsum("ncp,ndp->ncd", j1, j1)}


def _operands(model: Head, x: torch.Tensor, kind: str):
    a, g = _grads(model, x)
    if kind == "pntk":
        g = g.sum(1, keepdim=True) / K ** 0.5
    ops = conv_operands if isinstance(model.layer, (nn.Conv1d, nn.Conv2d)) else linear_operands
    return ops(model.layer, a, g)


def _shape(kind: str, n1: int, n2: int) -> tuple[int, ...]:
    return {"full": (n1 * K, n2 * K), "traced": (n1, n2), "pntk": (n1, n2), "diagonal": (n1, K, K)}[kind]


def _check(layer: nn.Module, x_of, n1: int, n2: int, what: str, *, names=("weight", "bias"), mode=None,
           workspace_bytes=None) -> None:
    g, seed = seeded()
    torch.manual_seed(seed)
    layer = copy.deepcopy(layer)
    for p in layer.parameters():  # not the default init: a bias as large as the weight's terms
        p.data = torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p[0].numel() ** -0.5)
    x = x_of(n1 + n2, g)
    model = Head(layer, x, g)
    m64 = copy.deepcopy(model).double()
    x1, x2 = x[:n1], x[n1:]
    j64 = [_jacobian(m64, t.double(), names) for t in (x1, x2)]
    j32 = [_jacobian(model, t, names) for t in (x1, x2)]
    if mode is not None:  # plain torch at bfloat16 inputs, float32 accumulation
        j32 = [j.bfloat16().float() for j in j32]
    ref_x, plain_x = _kernels(*j64), _kernels(*j32)
    ref_s, plain_s = _kernels(j64[0], j64[0]), _kernels(j32[0], j32[0])
    kw = {"weight": "weight" in names, "bias": "bias" in names, "mode": mode}
    if workspace_bytes is not None:
        kw["workspace_bytes"] = workspace_bytes
    tag = f"{what} mode={mode} names={names} (seed {seed})"
    for kind in ("full", "traced", "pntk", "diagonal"):
        pa, ga = _operands(model, x1, kind)
        if kind != "diagonal":
            pb, gb = _operands(model, x2, kind)
            cross = pair_gram(torch.zeros(_shape(kind, n1, n2)), kind, pa, ga, pb, gb, **kw)
            assert_close_to_torch(cross, plain_x[kind], ref_x[kind], factor=FACTOR, what=f"{tag} {kind} cross")
        sym = pair_gram(torch.zeros(_shape(kind, n1, n1)), kind, pa, ga, **kw)
        if kind != "diagonal":
            symmetrize(sym)
        assert_close_to_torch(sym, plain_s[kind], ref_s[kind], factor=FACTOR, what=f"{tag} {kind} symmetric")


def _images(c, h, w):
    return lambda n, g: torch.randn(n, c, h, w, generator=g)


CONVS = {
    "conv2d stride/padding/dilation": (nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
                                       _images(3, 7, 9)),
    "conv2d groups=channels": (nn.Conv2d(4, 4, 3, padding=1, groups=4), _images(4, 5, 3)),
    "conv2d groups=2": (nn.Conv2d(4, 6, 2, stride=2, groups=2), _images(4, 5, 7)),
    "conv2d 1x1 map (T=1)": (nn.Conv2d(5, 7, 3, padding=1), _images(5, 1, 1)),
    "conv2d one output position": (nn.Conv2d(3, 4, (3, 5)), _images(3, 3, 5)),
    "conv2d padding=same, reflect": (nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
                                     _images(3, 5, 6)),
    "conv1d stride/dilation/groups": (nn.Conv1d(6, 9, 3, stride=2, dilation=2, padding=3, groups=3),
                                      lambda n, g: torch.randn(n, 6, 13, generator=g)),
    "conv1d circular": (nn.Conv1d(2, 3, 4, padding=2, padding_mode="circular"),
                        lambda n, g: torch.randn(n, 2, 7, generator=g)),
}
LINEARS = {
    "linear (n, L, d)": (nn.Linear(7, 5), lambda n, g: torch.randn(n, 6, 7, generator=g)),
    "linear (n, d) (T=1)": (nn.Linear(9, 4), lambda n, g: torch.randn(n, 9, generator=g)),
    "linear (n, L1, L2, d)": (nn.Linear(3, 4), lambda n, g: torch.randn(n, 2, 3, 3, generator=g)),
}


@pytest.mark.parametrize("case", list(CONVS) + list(LINEARS))
@pytest.mark.parametrize("names", [("weight", "bias"), ("weight",), ("bias",)])
def test_float32(case, names):
    layer, x_of = {**CONVS, **LINEARS}[case]
    _check(layer, x_of, 5, 4, case, names=names)


@pytest.mark.parametrize("case", ["conv2d stride/padding/dilation", "conv2d groups=channels",
                                  "conv1d stride/dilation/groups", "linear (n, L, d)"])
@pytest.mark.parametrize("mode", ["emulate", "native"])
def test_bfloat16_inputs_float32_accumulation(case, mode):
    layer, x_of = {**CONVS, **LINEARS}[case]
    _check(layer, x_of, 5, 4, case, mode=mode)


@pytest.mark.parametrize("case", ["conv2d stride/padding/dilation", "conv2d groups=2", "linear (n, L, d)"])
def test_sample_sub_blocks(case):
    # A workspace of a few pairs splits each tile into many sub-block products (and the
    # symmetric tile into its upper-triangle sub-blocks only).
    layer, x_of = {**CONVS, **LINEARS}[case]
    _check(layer, x_of, 7, 5, case, workspace_bytes=3 * 4 * 9 * 6 * 6 * 8)


def test_borrowed_scale_multiplies_the_output_gradients():
    g, seed = seeded()
    conv = nn.Conv2d(3, 4, 3, padding=1)
    a = torch.randn(3, 3, 5, 5, generator=g)
    grad = torch.randn(3, K, 4, 5, 5, generator=g)
    s = torch.rand(4, generator=g) + 0.5
    want = pair_gram(torch.zeros(3 * K, 3 * K), "full", *conv_operands(conv, a, grad * s.view(1, 1, -1, 1, 1)))
    got = pair_gram(torch.zeros(3 * K, 3 * K), "full", *conv_operands(conv, a, grad, s))
    torch.testing.assert_close(got, want, msg=lambda m: f"seed {seed}: {m}")


def test_refuses_unknown_kind_and_half_given_operands():
    p, g = torch.zeros(2, 1, 3, 4), torch.zeros(2, K, 1, 2, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        pair_gram(torch.zeros(6, 6), "trace", p, g)
    with pytest.raises(ValueError, match="pass both pb and gb"):
        pair_gram(torch.zeros(6, 6), "full", p, g, p, None)
    with pytest.raises(ValueError, match="diagonal kernel takes neither"):
        pair_gram(torch.zeros(2, K, K), "diagonal", p, g, p, g)
