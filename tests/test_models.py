"""Tests for engine.models: parameter counts, shapes, torch.func compatibility, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, stack_module_state, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from engine.errors import ConfigError
from engine.models import MODEL_NAMES, build_model, count_parameters, running_stat_layers
from engine.models.common import init_rule

# --- Expected parameter counts, from the architecture formulas -------------------


def conv3x3_bn(c_in: int, c_out: int, bias: bool = False) -> int:
    """A 3x3 conv (optionally with bias) followed by BatchNorm (gamma and beta)."""
    return 9 * c_in * c_out + (c_out if bias else 0) + 2 * c_out


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def resnet_params(n: int, num_classes: int) -> int:
    """CIFAR ResNet-(6n+2) with parameter-free (option A) shortcuts."""
    total = conv3x3_bn(3, 16)
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += conv3x3_bn(c_in, c) + conv3x3_bn(c, c)
            c_in = c
    return total + linear(64, num_classes)


# VGG configurations "A" (11 layers) and "D" (16 layers) of Simonyan & Zisserman,
# written out here rather than imported so that the test checks the model's config.
VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
}  # fmt: skip


def vgg_params(cfg: list, num_classes: int) -> int:
    total, c_in = 0, 3
    for v in cfg:
        if v != "M":
            total += conv3x3_bn(c_in, v, bias=True)
            c_in = v
    return total + linear(512, num_classes)


def mlp_params(num_classes: int, width: int = 128, in_features: int = 3 * 32 * 32) -> int:
    return linear(in_features, width) + linear(width, width) + linear(width, num_classes)


def cnn_params(num_classes: int, width: int = 16) -> int:
    w = width
    return (
        conv3x3_bn(3, w) + conv3x3_bn(w, 2 * w) + conv3x3_bn(2 * w, 4 * w)
        + linear(4 * w, num_classes)
    )  # fmt: skip


def expected_params(name: str, num_classes: int) -> int:
    if name.startswith("resnet"):
        depth = int(name.removeprefix("resnet"))
        return resnet_params((depth - 2) // 6, num_classes)
    if name in VGG_CFG:
        return vgg_params(VGG_CFG[name], num_classes)
    return {"mlp": mlp_params, "cnn": cnn_params}[name](num_classes)


# --- Helpers -----------------------------------------------------------------------


def seeded(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **kwargs)


def with_running_stats(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, then switch to eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(1 + 0.5 * torch.rand(m.num_features, generator=g))
    return model.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class RecordCalls(TorchFunctionMode):
    """Records the name of every torch-level function called.

    Needed besides RecordOps: in eval mode ``F.dropout`` runs no aten op at all, and
    ``F.adaptive_avg_pool2d(x, 1)`` lowers to a plain ``mean`` on the CPU.
    """

    def __init__(self):
        super().__init__()
        self.calls: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# --- Parameter counts --------------------------------------------------------------


def test_exact_reference_counts():
    # The published counts these architectures are known by.
    assert count_parameters(build_model("resnet20")) == 269_722
    assert count_parameters(build_model("vgg16")) == 14_728_266


@pytest.mark.parametrize("num_classes", [10, 7])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_matches_formula(name, num_classes):
    model = build_model(name, num_classes=num_classes)
    assert count_parameters(model) == expected_params(name, num_classes)


def test_count_parameters_skips_frozen():
    model = build_model("resnet20")
    model.fc.requires_grad_(False)
    assert count_parameters(model) == 269_722 - linear(64, 10)


def test_small_model_options_change_counts():
    assert count_parameters(build_model("mlp", width=32)) == mlp_params(10, 32)
    assert count_parameters(build_model("cnn", width=8)) == cnn_params(10, 8)
    mnist_mlp = build_model("mlp", in_shape=(1, 28, 28))
    assert count_parameters(mnist_mlp) == mlp_params(10, in_features=28 * 28)
    assert mnist_mlp(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# --- Shapes and structure ----------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes(name):
    for num_classes in (10, 7):
        model = build_model(name, num_classes=num_classes)
        assert model.arch == name
        # Train-mode BatchNorm needs more than one value per channel, so batch 1
        # is checked in eval mode only.
        for batch in (1, 3):
            with torch.no_grad():
                out = model.eval()(images(batch))
            assert out.shape == (batch, num_classes)
            assert out.dtype == torch.float32
            assert torch.isfinite(out).all()
    # One train-mode pass (batch statistics) with backward, on the last model built.
    out = model.train()(images(3))
    assert out.shape == (3, num_classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_adaptive_pool_dropout_or_inplace(name):
    model = build_model(name)
    forbidden = (
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
        nn.modules.dropout._DropoutNd,
    )  # fmt: skip
    for mod_name, mod in model.named_modules():
        assert not isinstance(mod, forbidden), f"{name}: {mod_name} is {type(mod).__name__}"
        assert not getattr(mod, "inplace", False), f"{name}: {mod_name} is in-place"
    # Also catch functional calls hidden in forward(): record what actually runs.
    x = images(2)
    ops, calls = RecordOps(), RecordCalls()
    with torch.no_grad(), ops, calls:
        model.eval()(x)
    bad = {op for op in ops.ops | calls.calls if "adaptive" in op or "dropout" in op}
    bad |= {op for op in ops.ops if op.endswith("_")}  # aten's in-place ops end in "_"
    assert not bad, f"{name} runs {sorted(bad)}"


def test_conventional_parameter_names():
    names = {n: set(dict(build_model(n).named_parameters())) for n in MODEL_NAMES}
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.2.bn2.bias",
            "fc.weight", "fc.bias"} <= names["resnet20"]  # fmt: skip
    assert {"features.0.weight", "features.1.weight", "classifier.weight"} <= names["vgg16"]
    assert {"fc1.weight", "fc2.weight", "fc3.weight"} <= names["mlp"]
    assert {"conv1.weight", "bn1.weight", "conv3.weight", "fc.weight"} <= names["cnn"]
    # Option-A shortcuts carry no parameters.
    assert not any("shortcut" in n for n in names["resnet56"])


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = build_model("resnet20").layer2[0]
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


# --- torch.func --------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_vmap_functional_call_matches_eager(name):
    models = [with_running_stats(seeded(name, seed), seed) for seed in (0, 1)]
    params, buffers = stack_module_state(models)
    base = models[0]
    x = images(2)

    def f(p, b, x):
        return functional_call(base, (p, b), (x,))

    with torch.no_grad():
        out = vmap(f, in_dims=(0, 0, None))(params, buffers, x)
        eager = torch.stack([m(x) for m in models])
    assert out.shape == (2, 2, 10)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    # The two copies really are different models.
    assert not torch.allclose(eager[0], eager[1])


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_vmap_train_mode_updates_stacked_running_stats(name):
    # Twin runs step both copies at once: batch statistics and running-stat updates
    # must behave per copy under vmap, as in eager mode.
    models = [seeded(name, seed).train() for seed in (0, 1)]
    params, buffers = stack_module_state(models)
    x = images(4)

    def f(p, b, x):
        return functional_call(models[0], (p, b), (x,))

    with torch.no_grad():
        out = vmap(f, in_dims=(0, 0, None))(params, buffers, x)
        eager = torch.stack([m(x) for m in models])
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for i, m in enumerate(models):
        for k, v in m.named_buffers():
            torch.testing.assert_close(buffers[k][i], v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_jacrev_matches_autograd(name):
    model = with_running_stats(seeded(name), 0)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = images(2 if name != "resnet20" else 1)  # a full resnet20 Jacobian is slow on CPU

    def f(p):
        return functional_call(model, (p, buffers), (x,))

    jac = jacrev(f)(params)
    out = model(x)
    for i, c in [(0, 0), (len(x) - 1, 7)]:
        grads = torch.autograd.grad(out[i, c], list(model.parameters()), retain_graph=True)
        for (k, p), g in zip(params.items(), grads, strict=True):
            assert jac[k].shape == (len(x), 10, *p.shape)
            torch.testing.assert_close(jac[k][i, c], g, rtol=1e-4, atol=1e-6)


# --- Errors and reproducibility ----------------------------------------------------


@pytest.mark.parametrize("bad", ["resnet18", "VGG16", "", "res net20"])
def test_unknown_name_raises_config_error(bad):
    with pytest.raises(ConfigError) as info:
        build_model(bad)
    msg = str(info.value)
    assert repr(bad) in msg
    assert "\n" not in msg
    assert all(n in msg for n in MODEL_NAMES)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("num_classes", [0, -3])
def test_bad_num_classes_raises_config_error(num_classes):
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("cnn", num_classes=num_classes)


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="width"):
        build_model("resnet20", width=32)
    with pytest.raises(ConfigError, match="width"):
        build_model("cnn", width=0)
    with pytest.raises(ConfigError, match="in_shape"):
        build_model("mlp", in_shape=(3, 0, 32))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights(name):
    a, b, c = seeded(name, 7), seeded(name, 7), seeded(name, 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_init_scheme():
    model = seeded("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert not m.bias.any()
    # Kaiming-normal, fan_out: std = sqrt(2 / (out_channels * 3 * 3)).
    w = model.layer3[1].conv2.weight
    assert abs(w.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.05


def _isinstance_init(model: nn.Module) -> None:
    """The initialisation as it was written before the init-rule table: the oracle of the table."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_init_rule_table_is_bit_identical_to_the_isinstance_chain(name, monkeypatch):
    # Same seed, same RNG draws in the same module order: every parameter and buffer bit for bit.
    # (A recorded checksum would tie the test to one CPU: torch's normal_ differs in the last bits
    # between its AVX2 and AVX-512 kernels.)
    ours = seeded(name).state_dict()
    for mod in ("engine.models.small", "engine.models.resnet", "engine.models.vgg"):
        monkeypatch.setattr(f"{mod}.init_weights", _isinstance_init)
    theirs = seeded(name).state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_init_rule_of_a_subclass_is_its_nearest_base():
    class MyConv(nn.Conv2d):
        pass

    assert init_rule(MyConv(3, 4, 3)) is init_rule(nn.Conv2d(3, 4, 3)) is not None
    assert init_rule(nn.Linear(2, 3)) is not init_rule(nn.Conv2d(3, 4, 3))
    assert init_rule(nn.ReLU()) is None and init_rule(nn.LayerNorm(4)) is None


def test_running_stat_layers():
    # the zoo: exactly its BatchNorm layers (the mlp has none)
    for name in MODEL_NAMES:
        model = build_model(name)
        assert [n for n, _ in running_stat_layers(model)] == \
            [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)], name
    assert len(running_stat_layers(build_model("resnet20"))) == 19 and running_stat_layers(build_model("mlp")) == []
    # told by running statistics kept, not by type
    net = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.InstanceNorm2d(3, track_running_stats=True),
                        nn.InstanceNorm2d(3), nn.LayerNorm(3), nn.BatchNorm1d(3))
    assert [n for n, _ in running_stat_layers(net)] == ["1", "4"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cuda_backward_is_deterministic(name, monkeypatch):
    # cuBLAS only runs deterministically with a fixed workspace configuration.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = seeded(name).cuda()
        x, y = images(8).cuda(), torch.arange(8, device="cuda") % 10
        grads = []
        for _ in range(2):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads, strict=True))
    finally:
        torch.use_deterministic_algorithms(previous)
