"""entk(contraction=...): spatial pairs and materialised columns give the same kernel.

On a small VGG-like net (BatchNorm, pooling down to a 1x1 map) and resnet20 (strided convs,
shortcuts, BatchNorm borrowing its conv's gradient), on small random inputs: every kernel kind,
cross-kernels and per-layer kernels, with contraction "pairs" and "materialise", each against the
float64 torch.func truth within FACTOR x plain torch's float32 error (tests/_tolerance.py), and
"auto" taking the pair path where the planner says it is cheaper. Seeds are printed on failure.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import engine.ntk.onepass as onepass
from engine.errors import ConfigError
from engine.models import build_model
from engine.models.vgg import VGG
from engine.ntk import entk, plan
from tests._tolerance import assert_close_to_torch
from tests.seeding import seeded

FACTOR = 8.0
KINDS = ("full", "traced", "diagonal", "pntk")


def _jacobian(model: nn.Module, x: torch.Tensor, names=None) -> torch.Tensor:
    """(n, C, P) per-sample Jacobian by torch.func (parameters ``names``, default all)."""
    params = {k: v.detach() for k, v in model.named_parameters() if names is None or k in names}

    def single(p, x1):
        return functional_call(model, p, (x1.unsqueeze(0),))[0]

    jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
    c = next(iter(jac.values())).shape[1]
    return torch.cat([jac[k].reshape(x.shape[0], c, -1) for k in params], dim=2).detach()


def _kernel(kind: str, j1: torch.Tensor, j2: torch.Tensor) -> torch.Tensor:
    n1, c, p = j1.shape
    full = j1.reshape(n1 * c, p) @ j2.reshape(-1, p).T
    f4 = full.view(n1, c, -1, c)
    return {"full": full, "traced": f4.diagonal(dim1=1, dim2=3).sum(-1), "pntk": f4.sum((1, 3)) / c,
            "diagonal": torch.einsum("ncp,ndp->ncd", j1, j1)}[kind]


def _randomize_bn(model: nn.Module, g: torch.Generator) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _models(g):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    vgg = _randomize_bn(VGG([6, "M", 10, 10, "M", 12, "M"], num_classes=3), g)
    res = _randomize_bn(build_model("resnet20", num_classes=3), g)
    return {"vgg-like 8x8": (vgg, (3, 8, 8)), "resnet20 8x8": (res, (3, 8, 8))}


@pytest.mark.parametrize("name", ["vgg-like 8x8", "resnet20 8x8"])
def test_pairs_and_materialise_agree_with_float64_every_kind(name):
    g, seed = seeded()
    model, shape = _models(g)[name]
    x1, x2 = torch.randn(3, *shape, generator=g), torch.randn(2, *shape, generator=g)
    m64 = copy.deepcopy(model).double()
    j64 = [_jacobian(m64, x.double()) for x in (x1, x2)]
    j32 = [_jacobian(model, x) for x in (x1, x2)]
    for kind in KINDS:
        cases = [(None, 0)] + ([] if kind == "diagonal" else [(x2, 1)])
        for xb, jb in cases:
            ref, plain = _kernel(kind, j64[0], j64[jb]), _kernel(kind, j32[0], j32[jb])
            for how in ("pairs", "materialise", "auto"):
                h = entk(model, x1, xb, kernel=kind, contraction=how)
                what = f"{name} {kind} {'cross' if jb else 'symmetric'} contraction={how} (seed {seed})"
                assert h.shape == ref.shape, what
                assert_close_to_torch(h, plain, ref, factor=FACTOR, what=what)


def test_per_layer_kernels_by_pairs_sum_to_the_kernel():
    g, seed = seeded()
    model, shape = _models(g)["vgg-like 8x8"]
    x = torch.randn(4, *shape, generator=g)
    m64 = copy.deepcopy(model).double()
    layers = entk(model, x, per_layer=True, contraction="pairs")
    whole = entk(model, x, contraction="pairs")
    total = sum(layers.values())
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item(),
                               msg=lambda m: f"seed {seed}: {m}")
    for key, h in layers.items():
        names = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] == key]
        ref = _kernel("full", *[_jacobian(m64, x.double(), names)] * 2)
        plain = _kernel("full", *[_jacobian(model, x, names)] * 2)
        assert_close_to_torch(h, plain, ref, factor=FACTOR, what=f"per-layer {key} (seed {seed})")


def test_bfloat16_pairs_against_rounded_torch():
    g, seed = seeded()
    model, shape = _models(g)["vgg-like 8x8"]
    x = torch.randn(3, *shape, generator=g)
    j64 = _jacobian(copy.deepcopy(model).double(), x.double())
    jb = _jacobian(model, x).bfloat16().float()  # plain torch at bfloat16 inputs, float32 accumulation
    for kind in KINDS:
        ref, plain = _kernel(kind, j64, j64), _kernel(kind, jb, jb)
        for how in ("pairs", "materialise"):
            h = entk(model, x, kernel=kind, contraction=how, compute_dtype=torch.bfloat16)
            e, e_t = [float((t.double() - ref).norm() / ref.norm()) for t in (h, plain)]
            assert e <= FACTOR * max(e_t, torch.finfo(torch.bfloat16).eps), \
                f"bf16 {kind} {how}: error {e:.3g} vs torch's {e_t:.3g} (seed {seed})"


def test_auto_takes_pairs_where_the_plan_does(monkeypatch):
    g, seed = seeded()
    torch.manual_seed(seed)
    # A wide conv on a 2x2 map: pairs are far cheaper than its 2·10^5 columns per row.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4),
                          nn.Conv2d(8, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 160, 3, padding=1),
                          nn.Flatten(), nn.Linear(640, 4)).eval()
    x = torch.randn(6, 3, 8, 8, generator=g)
    seen = []
    real = onepass.pair_gram
    monkeypatch.setattr(onepass, "pair_gram", lambda out, kind, pa, *a, **k: seen.append(pa.shape) or
                        real(out, kind, pa, *a, **k))
    h = entk(model, x, contraction="auto")
    planned = plan(model, x).strategies()
    assert planned["5"] == "pairs" and planned["0"] == "materialise", planned
    # The driver's choice is the plan's: one pair product per planned layer, none for the first conv.
    assert len(seen) == sum(v == "pairs" for v in planned.values()), f"seed {seed}: {seen} vs {planned}"
    assert {(128 * 9, 4), (640, 1)} <= {tuple(s[2:]) for s in seen} and (27, 64) not in {tuple(s[2:]) for s in seen}
    seen.clear()
    torch.testing.assert_close(entk(model, x, contraction="materialise"), h, rtol=1e-4, atol=1e-4 * h.abs().max())
    assert not seen


def test_contraction_is_checked():
    with pytest.raises(ConfigError, match="contraction must be one of"):
        entk(nn.Linear(3, 2).eval(), torch.randn(2, 3), contraction="ghost")


def test_kernel_commands_take_contraction():
    import importlib

    from engine.cli import build_parser

    kj = importlib.import_module("engine.jobs.kernel_job.tiles")

    parser = build_parser()
    assert parser.parse_args(["ntk", "--run", "r.h5", "--out", "k.h5", "--contraction", "pairs"]).contraction == "pairs"
    assert parser.parse_args(["kernel", "--x1", "test:4", "--out", "k.h5"]).contraction == "auto"
    # entk kernel's tiles come from entk with the contraction asked for: the same tile either way.
    g, seed = seeded()
    model, shape = _models(g)["vgg-like 8x8"]
    xa, xb = torch.randn(3, *shape, generator=g), torch.randn(2, *shape, generator=g)
    tiles = {how: kj.tile(model, xa, xb, kj.KernelKind.FULL, torch.float32, 1 << 28, how)
             for how in ("pairs", "materialise")}
    torch.testing.assert_close(tiles["pairs"], tiles["materialise"], rtol=1e-4,
                               atol=1e-4 * tiles["materialise"].abs().max().item(), msg=lambda m: f"seed {seed}: {m}")
