"""entk_fn (the functional entry point) against a plain float64 torch.func reference, on fresh
random small models with odd shapes: every kernel shape, cross-kernels, per-layer kernels,
parameter subsets, integer and tuple inputs, bfloat16, the budget, and the errors."""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from engine.errors import ConfigError
from engine.ntk.functional import entk_fn
from engine.ntk.params import layer_of
from tests._tolerance import assert_close_to_torch, rel_err
from tests.seeding import seeded

# ---------------------------------------------------------------------------------------------
# fresh random models with odd shapes


class ConvNet(nn.Module):
    """Stride, padding, groups, dilation, with and without bias, BatchNorm (eval), GroupNorm."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 2, padding=2, dilation=2, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 5 * 6, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.tanh(self.gn(self.c2(h))).flatten(1))


class TokenNet(nn.Module):
    """Embedding + LayerNorm + Linear on integer token ids."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.ln(self.emb(ids)).mean(1)))


class AttnNet(nn.Module):
    """MultiheadAttention between two Linear layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(a + h).mean(1))


class TiedNet(nn.Module):
    """Output layer tied to the embedding, and a module used twice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        return self.out(self.mid(torch.tanh(self.mid(h))))


class TwoInputNet(nn.Module):
    """Takes a tuple (features, token ids)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.emb = nn.Embedding(9, 5)
        self.fc = nn.Linear(5, 4)

    def forward(self, xy):
        x, ids = xy
        return self.fc(torch.tanh(self.a(x) + self.emb(ids).sum(1)))


def _inputs(kind: str, n: int, g: torch.Generator):
    if kind == "conv":
        return torch.randn(n, 3, 5, 7, generator=g)
    if kind == "token":
        return torch.randint(0, 13, (n, 7), generator=g)
    if kind == "attn":
        return torch.randn(n, 5, 4, generator=g)
    if kind == "tied":
        return torch.randint(0, 11, (n, 4), generator=g)
    return torch.randn(n, 4, generator=g), torch.randint(0, 9, (n, 3), generator=g)


MODELS = {"conv": ConvNet, "token": TokenNet, "attn": AttnNet, "tied": TiedNet, "two": TwoInputNet}


def _model(kind: str, g: torch.Generator) -> nn.Module:
    m = MODELS[kind]()
    with torch.no_grad():
        for p in m.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.5
            p.normal_(0.0, std, generator=g)
        for mod in m.modules():  # non-trivial running statistics
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
    return m.eval()


def _apply(model):
    return lambda p, x: functional_call(model, p, (x,))


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    return tuple(_cast(t, dtype) for t in x)


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return tuple(torch.cat([s, t]) for s, t in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# the plain reference: jacrev of the batched outputs → flatten → concatenate → J1 J2ᵀ


def reference_jacobian(model, x, dtype, names=None) -> dict[str, torch.Tensor]:
    """name -> (N·C, cols) Jacobian columns, in ``dtype``, row n·C + c."""
    m = copy.deepcopy(model).to(dtype)
    params = {n: p.detach() for n, p in m.named_parameters() if names is None or n in names}
    jac = jacrev(lambda p: functional_call(m, p, (_cast(x, dtype),)))(params)
    return {n: j.reshape(j.shape[0] * j.shape[1], -1) for n, j in jac.items()}


def _j(cols: dict[str, torch.Tensor], names=None) -> torch.Tensor:
    return torch.cat([v for n, v in cols.items() if names is None or n in names], dim=1)


def shapes_from(J1: torch.Tensor, J2: torch.Tensor, c: int) -> dict[str, torch.Tensor]:
    """Every kernel shape the plain way, from the Jacobians (in their precision)."""
    n1, n2 = J1.shape[0] // c, J2.shape[0] // c
    h = J1 @ J2.T
    p1, p2 = J1.view(n1, c, -1).sum(1) / math.sqrt(c), J2.view(n2, c, -1).sum(1) / math.sqrt(c)
    out = {"full": h, "traced": h.view(n1, c, n2, c).diagonal(dim1=1, dim2=3).sum(-1), "pntk": p1 @ p2.T}
    if J1 is J2:
        j3 = J1.view(n1, c, -1)
        out["diagonal"] = torch.bmm(j3, j3.transpose(1, 2))
    return out


def _params(model, dtype=None):
    return {n: (p.detach() if dtype is None else p.detach().to(dtype)) for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_shape_symmetric_and_cross_against_float64(kind):
    g, seed = seeded()
    model = _model(kind, g)
    x1, x2 = _inputs(kind, 3, g), _inputs(kind, 4, g)
    x = _cat(x1, x2)
    n1 = 3
    j64 = _j(reference_jacobian(model, x, torch.float64))
    j32 = _j(reference_jacobian(model, x, torch.float32))
    c = j64.shape[0] // 7
    ref, tor = shapes_from(j64, j64, c), shapes_from(j32, j32, c)
    r1 = slice(0, n1 * c)
    rx, tx = shapes_from(j64[r1], j64[n1 * c:], c), shapes_from(j32[r1], j32[n1 * c:], c)
    f, p = _apply(model), _params(model)
    for shape in ("full", "traced", "diagonal", "pntk"):
        h = entk_fn(f, p, x, kernel=shape)
        assert h.shape == ref[shape].shape and h.dtype == torch.float32, f"seed {seed}: {shape} {tuple(h.shape)}"
        assert_close_to_torch(h, tor[shape], ref[shape], what=f"seed {seed}: {kind} {shape}")
        if shape == "diagonal":
            assert torch.equal(h, h.transpose(1, 2)), f"seed {seed}: diagonal blocks not exactly symmetric"
            continue
        assert torch.equal(h, h.T), f"seed {seed}: {shape} not exactly symmetric"
        hx = entk_fn(f, p, x1, x2, kernel=shape)
        assert hx.shape == rx[shape].shape, f"seed {seed}: cross {shape} {tuple(hx.shape)}"
        assert_close_to_torch(hx, tx[shape], rx[shape], what=f"seed {seed}: {kind} cross {shape}")
        # The cross-kernel is the matching block of the kernel of the concatenated inputs.
        u = c if shape == "full" else 1
        block = h[:n1 * u, n1 * u:]
        eps = torch.finfo(torch.float32).eps
        bound = 8 * max(rel_err(tx[shape], rx[shape]), eps)
        assert rel_err(hx, block) <= bound, f"seed {seed}: {kind} cross {shape} vs block {rel_err(hx, block):.3g}"


@pytest.mark.parametrize(("kind", "shape"), [("conv", "full"), ("tied", "traced")])
def test_per_layer_kernels_sum_to_the_full_kernel(kind, shape):
    g, seed = seeded()
    model = _model(kind, g)
    x = _inputs(kind, 5, g)
    cols64 = reference_jacobian(model, x, torch.float64)
    cols32 = reference_jacobian(model, x, torch.float32)
    c = _j(cols64).shape[0] // 5
    f, p = _apply(model), _params(model)
    layers = entk_fn(f, p, x, kernel=shape, per_layer=True)
    expect = list(dict.fromkeys(layer_of(n) for n, _ in model.named_parameters()))
    assert list(layers) == expect, f"seed {seed}: groups {list(layers)}"
    for group, h in layers.items():
        names = [n for n in cols64 if layer_of(n) == group]
        ref = shapes_from(_j(cols64, names), _j(cols64, names), c)[shape]
        tor = shapes_from(_j(cols32, names), _j(cols32, names), c)[shape]
        assert torch.equal(h, h.T), f"seed {seed}: {group} not exactly symmetric"
        assert_close_to_torch(h, tor, ref, what=f"seed {seed}: {kind} layer {group} {shape}")
    total = sum(layers.values())
    ref = shapes_from(_j(cols64), _j(cols64), c)[shape]
    tor = shapes_from(_j(cols32), _j(cols32), c)[shape]
    assert_close_to_torch(total, tor, ref, what=f"seed {seed}: {kind} sum of layers {shape}")


@pytest.mark.parametrize("kind", ["attn", "two"])
def test_parameter_subsets(kind):
    g, seed = seeded()
    model = _model(kind, g)
    x = _inputs(kind, 4, g)
    all_names = [n for n, _ in model.named_parameters()]
    pick = torch.randperm(len(all_names), generator=g)[: max(1, len(all_names) // 2)].tolist()
    names = [all_names[i] for i in sorted(pick)]
    j64 = _j(reference_jacobian(model, x, torch.float64, names))
    j32 = _j(reference_jacobian(model, x, torch.float32, names))
    c = j64.shape[0] // 4
    ref, tor = shapes_from(j64, j64, c), shapes_from(j32, j32, c)
    for shape in ("full", "pntk"):
        h = entk_fn(_apply(model), _params(model), x, kernel=shape, param_names=names)
        assert_close_to_torch(h, tor[shape], ref[shape], what=f"seed {seed}: {kind} subset {names} {shape}")


@pytest.mark.parametrize("kind", ["conv", "two"])
def test_bfloat16_error_bounded_by_torchs_own_bfloat16_product(kind):
    g, seed = seeded()
    model = _model(kind, g)
    x1, x2 = _inputs(kind, 5, g), _inputs(kind, 3, g)
    f, p = _apply(model), _params(model)
    a64, b64 = (_j(reference_jacobian(model, x, torch.float64)) for x in (x1, x2))
    a32, b32 = (_j(reference_jacobian(model, x, torch.float32)) for x in (x1, x2))
    c = a64.shape[0] // 5
    # Plain torch doing the same bfloat16 products, both against float64.
    for shape, xb, j64, j32 in (("full", None, a64, a32), ("traced", x2, b64, b32), ("pntk", None, a64, a32),
                                ("diagonal", None, a64, a32)):
        ref = shapes_from(a64, a64 if xb is None else j64, c)[shape]
        bf = a32.bfloat16()
        tor = shapes_from(bf, bf if xb is None else j32.bfloat16(), c)[shape]
        h = entk_fn(f, p, x1, xb, kernel=shape, compute_dtype=torch.bfloat16)
        assert h.dtype == torch.float32, f"seed {seed}: bf16 mode returned {h.dtype}"
        assert_close_to_torch(h, tor, ref, what=f"seed {seed}: {kind} bf16 {shape} cross={xb is not None}")


def test_float64_params_give_a_float64_kernel():
    g, seed = seeded()
    model = _model("conv", g)
    x = _inputs("conv", 4, g)
    j64 = _j(reference_jacobian(model, x, torch.float64))
    j32 = _j(reference_jacobian(model, x, torch.float32))
    ref, tor = j64 @ j64.T, j32 @ j32.T
    m64 = copy.deepcopy(model).double()
    h = entk_fn(_apply(m64), _params(m64), x.double())
    assert h.dtype == torch.float64, f"seed {seed}: {h.dtype}"
    # No higher precision to measure float64 against: torch's float32 error scaled by the unit roundoffs.
    scale = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    bound = 4 * max(rel_err(tor, ref) * scale, torch.finfo(torch.float64).eps)
    assert rel_err(h, ref) <= bound, f"seed {seed}: float64 error {rel_err(h, ref):.3g} > {bound:.3g}"


class _Counting:
    """apply_fn that counts its calls (vmap traces it once per Jacobian block)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, p, x):
        self.calls += 1
        return functional_call(self.model, p, (x,))


def test_tiled_budget_row_blocks_and_chunks_match_and_stay_exactly_symmetric():
    """A budget for two samples per row block: several row blocks and parameter chunks, tuple inputs."""
    g, seed = seeded()
    model = _model("two", g)
    x1, x2 = _inputs("two", 5, g), _inputs("two", 3, g)
    p = _params(model)
    widest = max(v.numel() for v in p.values())
    a64, a32 = (_j(reference_jacobian(model, x1, dt)) for dt in (torch.float64, torch.float32))
    c = a64.shape[0] // 5
    ref, tor = shapes_from(a64, a64, c), shapes_from(a32, a32, c)
    for shape in ("full", "pntk", "diagonal"):  # traced tiles index like pntk's
        rows = 1 if shape == "pntk" else c
        budget = 2 * 2 * widest * rows * 8  # two row blocks x 2 samples; 8 B held per float32 element
        f = _Counting(model)
        h = entk_fn(f, p, x1, kernel=shape, budget_bytes=budget)
        assert f.calls > 4, f"seed {seed}: budget {budget} did not tile {shape} ({f.calls} calls)"
        assert_close_to_torch(h, tor[shape], ref[shape], what=f"seed {seed}: tiled {shape}")
        sym = h.transpose(1, 2) if shape == "diagonal" else h.T
        assert torch.equal(h, sym), f"seed {seed}: tiled {shape} not exactly symmetric"
    b64, b32 = (_j(reference_jacobian(model, x2, dt)) for dt in (torch.float64, torch.float32))
    f = _Counting(model)
    hx = entk_fn(f, p, x1, x2, budget_bytes=2 * 2 * widest * c * 8)
    assert f.calls > 4, f"seed {seed}: cross did not tile ({f.calls} calls)"
    assert_close_to_torch(hx, a32 @ b32.T, a64 @ b64.T, what=f"seed {seed}: tiled cross")


def test_budget_too_small_is_refused_before_any_jacobian():
    g, seed = seeded()
    model = _model("conv", g)
    x = _inputs("conv", 6, g)
    f = _Counting(model)
    with pytest.raises(ConfigError, match=r"budget_bytes=1000 is too small.*'fc.weight'") as e:
        entk_fn(f, _params(model), x, budget_bytes=1000)
    assert "\n" not in str(e.value)
    assert f.calls == 1, f"seed {seed}: {f.calls} calls to apply_fn before refusing (only the one-sample probe)"


def _bad_calls():
    m = TokenNet().eval()
    f, p = _apply(m), _params(m)
    ids = torch.randint(0, 13, (4, 7))
    two = TwoInputNet().eval()
    f2, p2 = _apply(two), _params(two)
    xy = (torch.randn(4, 4), torch.randint(0, 9, (4, 3)))
    return [
        (lambda: entk_fn("model", p, ids), "apply_fn must be callable"),
        (lambda: entk_fn(f, [1, 2], ids), "params must be a dict"),
        (lambda: entk_fn(f, {}, ids), "params is empty"),
        (lambda: entk_fn(f, {"emb.weight": 3.0}, ids), r"params\['emb.weight'\] must be a tensor"),
        (lambda: entk_fn(f, {**p, "n": torch.tensor(3)}, ids), r"params\['n'\] is torch.int64"),
        (lambda: entk_fn(f, p, ids, kernel="trace"), "kernel must be one of full, traced, diagonal, pntk"),
        (lambda: entk_fn(f, p, ids, param_names=["emb.weigth"]), "unknown parameter name.*'emb.weigth'.*valid"),
        (lambda: entk_fn(f, p, ids, param_names=[]), "param_names is empty"),
        (lambda: entk_fn(f, p, ids, param_names=["fc.bias", "fc.bias"]), "more than once"),
        (lambda: entk_fn(f, p, ids, ids, kernel="diagonal"), "x2 must be None"),
        (lambda: entk_fn(f, p, ids, ids[:, :5]), r"x2 must have per-sample shape \(7,\)"),
        (lambda: entk_fn(f, p, ids, ids.float()), "dtype torch.int64"),
        (lambda: entk_fn(f, p, ids, (ids,)), r"x2 must have the structure of x1 \(a tensor\)"),
        (lambda: entk_fn(f, p, ids[:0]), "x1 has no samples"),
        (lambda: entk_fn(f, p, torch.tensor(3)), "0-d tensor"),
        (lambda: entk_fn(f, p, [ids, "a"]), r"x1\[1\] must be a tensor"),
        (lambda: entk_fn(f2, p2, (xy[0], xy[1][:3])), r"x1\[1\] has batch size 3 but x1\[0\] has 4"),
        (lambda: entk_fn(f2, p2, xy, xy[:1]), r"structure of x1 \(a tuple of 2 tensors\)"),
        (lambda: entk_fn(lambda q, x: f(q, x)[:, 0], p, ids), r"returned shape \(1,\)"),
        (lambda: entk_fn(lambda q, x: f(q, x).repeat(2, 1), p, ids), r"returned shape \(2, 3\)"),
        (lambda: entk_fn(lambda q, x: (f(q, x),), p, ids), "must return an \\(N, C\\) tensor, got tuple"),
        (lambda: entk_fn(f, p, ids, compute_dtype=torch.float16), "compute_dtype must be"),
        (lambda: entk_fn(f, p, ids, budget_bytes=0), "budget_bytes must be a positive"),
        (lambda: entk_fn(f, p, ids, per_layer="yes"), "per_layer must be True or False"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_gets_one_line(case):
    call, match = _bad_calls()[case]
    with pytest.raises(ConfigError, match=match) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)


def test_only_params_are_differentiated_and_outputs_are_not_tracked():
    """Integer inputs pass through; the caller's requires_grad parameters get no graph."""
    g, seed = seeded()
    model = _model("token", g)
    x = _inputs("token", 3, g)
    p = dict(model.named_parameters())  # requires_grad=True, as a user passes them
    h = entk_fn(_apply(model), p, x, kernel="traced")
    assert not h.requires_grad and h.grad_fn is None, f"seed {seed}"
    assert all(q.grad is None for q in model.parameters())


def test_tuple_list_and_named_tuple_inputs_agree():
    g, seed = seeded()
    model = _model("two", g)
    x, ids = _inputs("two", 4, g)
    pair = collections.namedtuple("Pair", "x ids")
    f, p = _apply(model), _params(model)
    h = entk_fn(f, p, (x, ids), kernel="traced")
    for other in ([x, ids], pair(x, ids)):
        assert torch.equal(entk_fn(f, p, other, kernel="traced"), h), f"seed {seed}: {type(other).__name__}"
