"""engine.metrics.twins: parameter dissimilarity and prediction disagreement."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.errors import ConfigError
from engine.metrics import disagreement, param_dissimilarity
from tests.metrics._common import EPS64, clone_state, labels, param_flat

# --------------------------------------------------------------------------- dissimilarity


def test_dissimilarity_identical_is_exactly_zero(pair):
    model, sa, _, _, _ = pair
    out = param_dissimilarity(model, sa, clone_state(sa))
    assert out == {"dissimilarity": 0.0, "l2": 0.0, "rel_l2": 0.0}
    assert all(type(v) is float for v in out.values())


def test_dissimilarity_scaled_and_negated(pair):
    model, sa, _, _, _ = pair
    params = {k for k, _ in model.named_parameters()}
    norm = float(param_flat(model, sa).norm())
    doubled = {k: 2 * v if k in params else v for k, v in sa.items()}
    out = param_dissimilarity(model, sa, doubled)
    assert abs(out["dissimilarity"]) <= 4 * EPS64
    assert out["l2"] == pytest.approx(norm, rel=16 * EPS64)
    assert out["rel_l2"] == pytest.approx(1.0, rel=16 * EPS64)
    negated = {k: -v if k in params else v for k, v in sa.items()}
    out = param_dissimilarity(model, sa, negated)
    assert out["dissimilarity"] == pytest.approx(2.0, rel=16 * EPS64)
    assert out["l2"] == pytest.approx(2 * norm, rel=16 * EPS64)
    assert out["rel_l2"] == pytest.approx(2.0, rel=16 * EPS64)


def test_dissimilarity_matches_cosine_and_ignores_buffers(pair):
    model, sa, sb, _, _ = pair
    a, b = param_flat(model, sa), param_flat(model, sb)
    out = param_dissimilarity(model, sa, sb)
    cos = float(a @ b / (a.norm() * b.norm()))
    assert out["dissimilarity"] == pytest.approx(1 - cos, rel=1e-12)
    assert out["l2"] == pytest.approx(float((a - b).norm()), rel=1e-12)
    assert out["rel_l2"] == pytest.approx(float((a - b).norm() / a.norm()), rel=1e-12)
    # Same parameters, different BatchNorm running statistics: buffers do not count.
    sc = {k: (sb[k] if "running" in k or "num_batches" in k else v) for k, v in sa.items()}
    assert param_dissimilarity(model, sa, sc)["dissimilarity"] == 0.0


def test_dissimilarity_keeps_precision_for_tiny_angles(pair):
    # Twin runs perturbed by ~1e-7 sit at 1 - cos ~ 1e-14, where the textbook formula
    # is pure rounding noise. Build θ' at a known angle φ to θ (float64 states; the
    # float32 template only supplies names and shapes) and check 1 - cos φ = 2 sin²(φ/2).
    model, sa, _, _, _ = pair
    names = [k for k, _ in model.named_parameters()]
    a = param_flat(model, sa)
    a_hat = a / a.norm()
    u = torch.randn(a.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u -= (u @ a_hat) * a_hat
    u /= u.norm()
    for phi in (1e-6, 1e-3, 0.5):
        b = a.norm() * (math.cos(phi) * a_hat + math.sin(phi) * u)
        s64a = {k: v.double() if v.is_floating_point() else v for k, v in sa.items()}
        s64b = dict(s64a)
        offset = 0
        for k in names:
            n = s64a[k].numel()
            s64b[k] = b[offset : offset + n].view_as(s64a[k])
            offset += n
        out = param_dissimilarity(model, s64a, s64b)
        assert out["dissimilarity"] == pytest.approx(2 * math.sin(phi / 2) ** 2, rel=1e-7), phi


def test_dissimilarity_of_zero_state_is_an_error(pair):
    model, sa, _, _, _ = pair
    zero = {k: torch.zeros_like(v) for k, v in sa.items()}
    with pytest.raises(ConfigError, match="all-zero"):
        param_dissimilarity(model, zero, sa)


# --------------------------------------------------------------------------- disagreement


def test_disagreement_identical_and_accuracy(pair):
    model, sa, _, x, _ = pair
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        pred = m(x).argmax(1)
    y = torch.where(torch.arange(len(x)) % 2 == 0, pred, labels(len(x), seed=4))  # ~55% correct
    out = disagreement(model, sa, clone_state(sa), x, y, batch_size=20)
    acc = float((pred == y).double().mean())
    assert out == {"disagreement": 0.0, "acc_a": acc, "acc_b": acc}
    assert 0.5 <= acc < 1.0


def test_disagreement_output_permuted_copy(pair):
    model, sa, sb, x, y = pair
    shift = torch.roll(torch.arange(10), 1)  # a derangement of the classes
    permuted = dict(sa, **{"fc.weight": sa["fc.weight"][shift], "fc.bias": sa["fc.bias"][shift]})
    out = disagreement(model, sa, permuted, x, y, batch_size=20)
    assert out["disagreement"] == 1.0
    mb = copy.deepcopy(model)
    mb.load_state_dict(sb)
    with torch.no_grad():
        acc_b = float((mb.eval()(x).argmax(1) == y).double().mean())
    assert disagreement(model, sa, sb, x, y)["acc_b"] == acc_b
