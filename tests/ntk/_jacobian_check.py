"""What the Jacobian tests share: seeded BatchNorm statistics, snapshots, the check against a
float64 reference (tolerances from precision, see tests/ntk/test_jacobian.py), and the odd models."""


from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from engine.ntk.jacobian import jacobian
from tests._tolerance import assert_close_to_torch, rel_err


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



# --------------------------------------------------------------------------- odd models


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
