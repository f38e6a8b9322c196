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
import re

import pytest
import torch
from torch import nn

from engine.errors import ConfigError
from engine.models import MODEL_NAMES, build_model
from engine.ntk.jacobian import jacobian, parameter_layout, structured_coverage
from engine.ntk.kinds import Implementation
from tests._tolerance import rel_err
from tests.ntk._jacobian_check import (
    OddConvNet,
    SharingNet,
    assert_untouched,
    check_against_float64,
    randomize_bn,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("fresh_seed")  # a fresh, printed torch seed per test (tests/ntk/conftest.py)


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
