"""Tests for engine.ntk.jacobian: structured vs reference backends, layouts, modes, errors.

Every test draws fresh random inputs and weights: the seed is printed (pytest shows
it with a failure) and ENTK_TEST_SEED=<seed> replays a run.

Tolerances come from precision, not magic constants: both float32 backends are
measured against a float64 reference, and the structured backend may be at most
4x less exact than torch.func's own float32 computation (floor: one float32 eps);
the float32 structured-vs-reference gap is additionally held under 1e-5.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from engine.errors import ConfigError
from engine.models import MODEL_NAMES, build_model
from engine.ntk.jacobian import jacobian, parameter_layout, structured_coverage
from engine.ntk.kinds import Implementation
from tests._tolerance import assert_close_to_torch, rel_err


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("ENTK_TEST_SEED", "0")) or torch.seed()
    torch.manual_seed(seed)
    print(f"torch seed {seed} (replay with ENTK_TEST_SEED={seed})")
    return seed


def randomize_bn(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their 0/1 defaults."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
    return model


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_untouched(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k].detach(), v), f"{k} changed"
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}.grad was set"
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {type(m).__name__}"


class Decisions(TorchFunctionMode):
    """Records the discrete choices of a forward: ReLU/PReLU signs, max-pool argmaxes."""

    def __init__(self):
        super().__init__()
        self.made: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("relu", "prelu", "leaky_relu"):
            self.made.append(args[0].detach() > 0)
        elif name in ("_max_pool2d", "max_pool2d"):
            inp, kernel, stride, padding, dilation, ceil = (*args, None, None, None, None, None)[:6]
            self.made.append(
                F.max_pool2d_with_indices(
                    inp.detach(),
                    kernel,
                    kwargs.get("stride", stride) or kernel,
                    kwargs.get("padding", padding) or 0,
                    kwargs.get("dilation", dilation) or 1,
                    kwargs.get("ceil_mode", ceil) or False,
                )[1]
            )
        return func(*args, **kwargs)


def off_kink_input(model: nn.Module, draw) -> Tensor:
    """An input whose float32 forward makes every ReLU/max-pool choice the float64 one does.

    J jumps across a kink: a pre-activation within float32 rounding of 0 (a few in a
    million for the deep models) flips one unit and moves J by ~1e-3 relative,
    which no tolerance derived from precision can cover, so such draws are redrawn.
    """
    m64 = copy.deepcopy(model).double()
    for _ in range(8):
        x = draw()
        with torch.no_grad(), Decisions() as d32:
            model(x)
        with torch.no_grad(), Decisions() as d64:
            m64(x.double())
        if all(torch.equal(a, b) for a, b in zip(d32.made, d64.made, strict=True)):
            return x
    pytest.fail("8 draws in a row had a ReLU/max-pool decision within float32 rounding of its kink")


def check_against_float64(model: nn.Module, draw, param_names=None, what: str = "") -> None:
    """structured ≈ reference in float32, both judged against a float64 reference."""
    model = randomize_bn(model).eval()
    x = off_kink_input(model, draw)
    js = jacobian(model, x, implementation="structured", param_names=param_names)
    jr = jacobian(model, x, implementation="reference", param_names=param_names)
    assert js.shape == jr.shape
    assert torch.isfinite(js).all()
    assert not js.requires_grad and not jr.requires_grad
    m64 = copy.deepcopy(model).double()
    j64 = jacobian(m64, x.double(), implementation="reference", param_names=param_names, dtype=torch.float64)
    assert_close_to_torch(js, jr, j64, factor=4.0, what=what)
    e, e_s, e_r = rel_err(js, jr), rel_err(js, j64), rel_err(jr, j64)
    # torch.func's vmapped forward rounds differently from the batched one and can
    # itself land across a kink the batched float32 and float64 forwards agree on;
    # then the structured result must match the float64 truth instead.
    assert e < 1e-5 or (e_s < 1e-5 and e_r > 10 * e_s), (
        f"{what}: structured vs reference float32 rel err {e:.3g} (vs float64: structured {e_s:.3g}, "
        f"reference {e_r:.3g})"
    )
    # In float64 the two backends must agree to float64 rounding.
    js64 = jacobian(m64, x.double(), implementation="structured", param_names=param_names, dtype=torch.float64)
    assert rel_err(js64, j64) < 1e-12, f"{what}: float64 rel err {rel_err(js64, j64):.3g}"


# --------------------------------------------------------------------------- model zoo

# vgg11/vgg16 (9.2M / 14.7M parameters) would need a multi-GB J: a few layers instead,
# including the first conv, a BatchNorm, a deep conv's bias and the classifier.
VGG_SUBSET = [
    "features.0.weight",
    "features.0.bias",
    "features.1.weight",
    "features.1.bias",
    "features.{last}.bias",
    "classifier.weight",
    "classifier.bias",
]
ZOO_N = {"mlp": 4, "cnn": 5, "resnet20": 3, "resnet32": 2, "resnet56": 2, "vgg11": 2, "vgg16": 2}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_structured_matches_reference_on_zoo(name):
    model = build_model(name)
    names = None
    if name.startswith("vgg"):
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        names = [s.format(last=convs[-1].split(".")[-1]) for s in VGG_SUBSET]
        # The deep conv's bias belongs to a conv whose output feeds only its BatchNorm.
        assert f"{convs[-1]}.bias" in names
    check_against_float64(model, lambda: torch.randn(ZOO_N[name], 3, 32, 32), names, what=name)
    if names is None:
        assert set(structured_coverage(model).values()) == {"structured"}


# --------------------------------------------------------------------------- odd shapes


class Scale(nn.Module):
    """A per-channel scale with its own parameter and no layer rule: the fallback."""

    def __init__(self, c: int):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain.view(1, -1, *([1] * (x.dim() - 2)))


class OddConvNet(nn.Module):
    """Odd channel counts on 7x9 images: stride, padding 0/1/2, dilation, groups, 'same', reflect."""

    def __init__(self, c: int):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.bn_a = nn.BatchNorm2d(5)
        self.bn_b = nn.BatchNorm2d(5)  # a BatchNorm feeding a BatchNorm: chained slopes
        self.conv_b = nn.Conv2d(5, 9, 3, padding=2, dilation=2, bias=False)
        self.prelu = nn.PReLU(9)
        self.conv_c = nn.Conv2d(9, 6, (3, 2), padding=0, groups=3)
        self.conv_d = nn.Conv2d(6, 5, 2, padding="same", bias=False)  # asymmetric 'same' padding
        self.scale = Scale(5)
        self.conv_e = nn.Conv2d(5, 7, 3, stride=(2, 1), padding=1, padding_mode="reflect")
        self.bn_e = nn.BatchNorm2d(7, affine=False)
        self.fc = nn.Linear(7, c)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn_b(self.bn_a(self.conv_a(x))))
        x = self.prelu(self.conv_b(x))
        x = torch.tanh(self.conv_c(x))
        x = self.scale(self.conv_d(x))
        x = F.relu(self.bn_e(self.conv_e(x)))
        return self.fc(x.mean(dim=(2, 3)))


class OddSeqNet(nn.Module):
    """Conv1d, BatchNorm1d on 3-D and 2-D inputs, Linear on 3-D input, LayerNorm, GroupNorm."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv1d(5, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.tok = nn.Linear(6, 9)  # applied to (N, T, 6)
        self.ln = nn.LayerNorm(9)
        self.gn = nn.GroupNorm(3, 9)
        self.hidden = nn.Linear(9, 11)
        self.bn2 = nn.BatchNorm1d(11)  # Linear -> BatchNorm1d on (N, F)
        self.head = nn.Linear(11, c)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))  # (N, 6, T)
        x = self.ln(torch.tanh(self.tok(x.transpose(1, 2))))  # (N, T, 9)
        x = self.gn(x.transpose(1, 2))  # (N, 9, T)
        x = F.relu(self.bn2(self.hidden(x.mean(dim=2))))
        return self.head(x)


class SharingNet(nn.Module):
    """A Linear called twice, a weight also used outside its module, an in-place edit."""

    def __init__(self, c: int):
        super().__init__()
        self.shared = nn.Linear(7, 7)
        self.edited = nn.Linear(7, 7)
        self.head = nn.Linear(7, c)
        self.unused = nn.Linear(7, c)  # owns parameters but never runs: zero columns

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h))  # reuse: contributions sum
        e = self.edited(h)
        e.mul_(2.0)  # in-place on a hooked output: the captured gradient would be wrong
        h = h + torch.tanh(e)
        # head.weight used by head and, tied, outside it: must fall back
        return self.head(h) + 0.5 * F.linear(torch.sin(h), self.head.weight)


ODD_CASES = [(1, 7), (3, 1), (5, 3)]  # (N, C)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # intended: asymmetric padding
@pytest.mark.parametrize(("n", "c"), ODD_CASES)
def test_odd_conv_shapes(n, c):
    model = OddConvNet(c)
    check_against_float64(model, lambda: torch.randn(n, 3, 7, 9), what=f"OddConvNet n={n} c={c}")
    cov = structured_coverage(model)
    assert cov["prelu.weight"] == "fallback" and cov["scale.gain"] == "fallback"
    assert {v for k, v in cov.items() if not k.startswith(("prelu", "scale"))} == {"structured"}


@pytest.mark.parametrize(("n", "c"), ODD_CASES)
def test_odd_sequence_shapes(n, c):
    model = OddSeqNet(c)
    check_against_float64(model, lambda: torch.randn(n, 5, 11), what=f"OddSeqNet n={n} c={c}")
    assert set(structured_coverage(model).values()) == {"structured"}


@pytest.mark.parametrize(("n", "c"), ODD_CASES)
def test_reuse_tying_and_inplace(n, c):
    model = SharingNet(c)
    x = torch.randn(n, 7)
    check_against_float64(model, lambda: x, what=f"SharingNet n={n} c={c}")
    static = structured_coverage(model)
    assert set(static.values()) == {"structured"}  # types alone look fine ...
    dynamic = structured_coverage(model, x)  # ... one forward finds the problems
    assert dynamic["shared.weight"] == "structured" and dynamic["shared.bias"] == "structured"
    assert dynamic["head.weight"] == "fallback" and dynamic["head.bias"] == "structured"
    assert dynamic["edited.weight"] == "fallback" and dynamic["edited.bias"] == "fallback"
    layout = {name: (s, e) for name, _, s, e in parameter_layout(model)}
    j = jacobian(model.eval(), x)
    s, e = layout["unused.weight"]
    assert torch.count_nonzero(j[:, s:e]) == 0


class WSConv(nn.Conv2d):
    """A Conv2d subclass that transforms its weight: it must not inherit the conv rule."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_subclass_with_own_forward_falls_back():
    model = nn.Sequential(WSConv(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 3))
    assert structured_coverage(model)["0.weight"] == "fallback"
    assert structured_coverage(model)["2.weight"] == "structured"
    check_against_float64(model, lambda: torch.randn(2, 3, 5, 5), what="WSConv")


# --------------------------------------------------------------------------- modes of use


@pytest.mark.parametrize("backend", ["structured", "reference"])
def test_projection_is_weighted_sum_of_rows(backend):
    model = randomize_bn(build_model("cnn", num_classes=7, width=4)).eval().double()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    v = torch.randn(7, dtype=torch.float64)
    full = jacobian(model, x, implementation=backend, dtype=torch.float64)
    proj = jacobian(model, x, implementation=backend, projection=v, dtype=torch.float64)
    assert proj.shape == (3, full.shape[1])
    expected = torch.einsum("ncp,c->np", full.view(3, 7, -1), v)
    assert rel_err(proj, expected) < 1e-12


@pytest.mark.parametrize("backend", ["structured", "reference"])
def test_param_names_select_columns_in_model_order(backend):
    model = randomize_bn(OddConvNet(3)).eval().double()
    x = torch.randn(3, 3, 7, 9, dtype=torch.float64)
    full = jacobian(model, x, implementation=backend, dtype=torch.float64)
    layout = {name: (s, e) for name, _, s, e in parameter_layout(model)}
    pick = ["fc.bias", "conv_b.weight", "scale.gain", "bn_a.weight"]  # out of order, one fallback
    sub = jacobian(model, x, implementation=backend, param_names=pick, dtype=torch.float64)
    order = [n for n in layout if n in pick]
    assert [n for n, *_ in parameter_layout(model, pick)] == order
    expected = torch.cat([full[:, layout[n][0] : layout[n][1]] for n in order], dim=1)
    assert sub.shape == expected.shape
    assert rel_err(sub, expected) < 1e-12


def test_parameter_layout_columns():
    model = build_model("cnn", width=4)
    layout = parameter_layout(model)
    assert [n for n, *_ in layout] == [n for n, _ in model.named_parameters()]
    col = 0
    for (name, shape, s, e), (pname, p) in zip(layout, model.named_parameters(), strict=True):
        assert (name, shape, s, e) == (pname, p.shape, col, col + p.numel())
        col = e
    sub = parameter_layout(model, ["fc.weight", "conv1.weight"])
    assert [(n, s) for n, _, s, _ in sub] == [("conv1.weight", 0), ("fc.weight", model.conv1.weight.numel())]


@pytest.mark.parametrize("backend", ["structured", "reference"])
def test_out_buffer_fully_written(backend):
    model = randomize_bn(SharingNet(3)).eval()
    x = torch.randn(5, 7)
    p = parameter_layout(model)[-1][3]
    out = torch.full((15, p), float("nan"))
    res = jacobian(model, x, implementation=backend, out=out, chunk_size=2)
    assert res is out
    assert not torch.isnan(out).any()
    assert rel_err(out, jacobian(model, x, implementation="reference")) < 1e-5
    proj = torch.full((5, p), float("nan"))
    jacobian(model, x, implementation=backend, projection=torch.randn(3), out=proj)
    assert not torch.isnan(proj).any()


def test_out_buffer_checks():
    model = build_model("cnn", width=4).eval()
    x = torch.randn(2, 3, 8, 8)
    p = parameter_layout(model)[-1][3]
    with pytest.raises(ConfigError, match=r"out has shape \(20, 5\); expected \(20, \d+\)"):
        jacobian(model, x, out=torch.empty(20, 5))
    with pytest.raises(ConfigError, match=re.escape("out has dtype torch.float64 but dtype=torch.float32")):
        jacobian(model, x, out=torch.empty(20, p, dtype=torch.float64))
    with pytest.raises(ConfigError, match="contiguous"):
        jacobian(model, x, out=torch.empty(p, 20).t())
    ok = jacobian(model, x, out=torch.empty(20, p, dtype=torch.float64), dtype=torch.float64)
    assert ok.dtype == torch.float64


def test_chunking_and_dtypes_agree():
    model = randomize_bn(build_model("cnn", width=4)).eval()
    x = torch.randn(5, 3, 8, 8)
    base = jacobian(model, x)
    for kw in ({"chunk_size": 1}, {"chunk_size": 2}, {"implementation": "reference", "chunk_size": 3}):
        assert rel_err(jacobian(model, x, **kw), base) < 1e-6, kw
    wide = jacobian(model, x, dtype=torch.float64)  # computed in float32, stored in float64
    assert wide.dtype == torch.float64 and torch.equal(wide.float(), base)
    m64, x64 = copy.deepcopy(model).double(), x.double()
    narrow = jacobian(m64, x64)  # computed in float64, stored in the default float32
    assert narrow.dtype == torch.float32
    assert rel_err(narrow, base) < 1e-5
    assert Implementation("auto") is Implementation.AUTO
    assert torch.equal(jacobian(model, x, implementation=Implementation.AUTO), base)
    with pytest.warns(DeprecationWarning, match="implementation"):
        assert torch.equal(jacobian(model, x, backend="structured"), base)


# --------------------------------------------------------------------------- modes & safety


def test_train_mode_refused_and_force_eval_restores():
    model = randomize_bn(build_model("cnn", width=4))
    model.train()
    model.bn2.eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    before = snapshot(model)
    x = torch.randn(3, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"is in train mode; BatchNorm must use running statistics: call "):
        jacobian(model, x)
    for backend in ("structured", "reference"):
        j = jacobian(model, x, implementation=backend, force_eval=True)
        assert [m.training for m in model.modules()] == flags
        assert_untouched(model, before)
    assert rel_err(j, jacobian(copy.deepcopy(model).eval(), x)) < 1e-5
    with pytest.raises(ConfigError, match="projection"):
        jacobian(model, x, force_eval=True, projection=torch.randn(3))  # fails inside eval mode
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_parameters_and_buffers_untouched(name):
    model = randomize_bn(build_model(name)).eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    jacobian(model, x, implementation="structured")
    jacobian(model, x, implementation="reference", projection=torch.randn(10))
    structured_coverage(model, x)
    assert_untouched(model, before)


def test_bad_inputs_are_config_errors():
    model = build_model("cnn", width=4).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        ConfigError, match=re.escape("x has dtype torch.float64 but the model's parameters are torch.float32")
    ):
        jacobian(model, x.double())
    # Integer inputs pass through (token ids); a float model then says they do not fit.
    with pytest.raises(ConfigError, match=r"x of shape \(2, 3, 8, 8\) does not fit model cnn"):
        jacobian(model, x.to(torch.uint8))
    with pytest.raises(ConfigError, match=r"x of shape \(2, 4, 8, 8\) does not fit model cnn"):
        jacobian(model, torch.randn(2, 4, 8, 8))
    with pytest.raises(ConfigError, match=r"N >= 1"):
        jacobian(model, torch.randn(0, 3, 8, 8))
    with pytest.raises(ConfigError, match=re.escape("x must be a torch.Tensor")):
        jacobian(model, [[1.0]])
    with pytest.raises(ConfigError, match=r"projection must be a float tensor of shape \(10,\)"):
        jacobian(model, x, projection=torch.randn(3))
    with pytest.raises(ConfigError, match="implementation must be one of"):
        jacobian(model, x, implementation="fast")
    with pytest.raises(ConfigError, match="chunk_size"):
        jacobian(model, x, chunk_size=0)
    with pytest.raises(ConfigError, match=r"unknown parameter name\(s\) 'conv9.weight'"):
        jacobian(model, x, param_names=["conv9.weight", "fc.bias"])
    model.conv1.weight.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"'conv1.weight' do not require grad"):
        parameter_layout(model, ["conv1.weight"])
    assert parameter_layout(model)[0][0] == "bn1.weight"  # frozen parameters have no columns


def test_batch_statistics_batchnorm_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 2)).eval()
    with pytest.raises(ConfigError, match="track_running_stats=False"):
        jacobian(model, torch.randn(3, 4))


def test_model_output_must_be_logits():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0)).eval()
    with pytest.raises(ConfigError, match=r"must return logits of shape \(N, C\)"):
        jacobian(model, torch.randn(2, 4))
