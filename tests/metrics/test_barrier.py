"""engine.metrics.barrier: the loss barrier, batched and against its reference loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.metrics import disagreement, loss_barrier, loss_barrier_reference, param_dissimilarity
from engine.models import build_model
from tests._tolerance import assert_close_to_torch
from tests.metrics._common import EPS64, clone_state, direct_loss, images, loss_tol

# --------------------------------------------------------------------------- loss barrier


def test_barrier_identical_states_is_zero(pair):
    model, sa, _, x, y = pair
    # torch.lerp gives θ_α = θ bit for bit at every α and the chord is lerp(L, L, α) = L,
    # so the plain loop gives gaps of exactly 0. In the vmapped pass every α slot runs the
    # same kernel on the same numbers (exactly 0 too on the machines tried), but batched
    # kernels do not promise per-slot bit equality, hence 0 <= barrier <= a few ulps there.
    ref = loss_barrier_reference(model, sa, clone_state(sa), x, y, alphas=5, batch_size=20)
    assert ref["barrier"] == 0.0
    assert ref["losses"] == [ref["loss_a"]] * 5 and ref["loss_a"] == ref["loss_b"]
    out = loss_barrier(model, sa, clone_state(sa), x, y, alphas=5, batch_size=20)
    assert 0.0 <= out["barrier"] <= loss_tol(out["loss_a"])
    assert max(abs(v - out["loss_a"]) for v in out["losses"]) <= loss_tol(out["loss_a"])


@pytest.mark.parametrize("bn", ["interpolate", "recompute"])
def test_barrier_vmap_matches_reference_loop(pair, bn):
    model, sa, sb, x, y = pair
    kw = dict(alphas=7, bn=bn, batch_size=20, bn_data=images(40, seed=3) if bn == "recompute" else None)
    out = loss_barrier(model, sa, sb, x, y, **kw)
    ref = loss_barrier_reference(model, sa, sb, x, y, **kw)
    assert out["alphas"] == ref["alphas"] == [i / 6 for i in range(7)]
    assert set(out) == {"barrier", "alpha_max", "alphas", "losses", "loss_a", "loss_b", "error_barrier",
                        "error_alpha_max", "errors", "error_a", "error_b"}
    tol = loss_tol(*ref["losses"])
    for a, lv, lr in zip(out["alphas"], out["losses"], ref["losses"], strict=True):
        assert abs(lv - lr) <= tol, f"alpha={a}: vmap {lv!r} vs loop {lr!r} (tol {tol:.3g})"
    assert abs(out["barrier"] - ref["barrier"]) <= 2 * tol
    assert (out["loss_a"], out["loss_b"]) == (out["losses"][0], out["losses"][-1])
    # Measured against a float64 loop, the batched pass is as exact as the float32 loop.
    s64 = [{k: v.double() if v.is_floating_point() else v for k, v in s.items()} for s in (sa, sb)]
    kw64 = dict(kw, bn_data=None if kw["bn_data"] is None else kw["bn_data"].double())
    ref64 = loss_barrier_reference(model, *s64, x.double(), y, **kw64)
    as_t = [torch.tensor(r["losses"], dtype=torch.float32 if r is not ref64 else torch.float64)
            for r in (out, ref, ref64)]
    assert_close_to_torch(as_t[0], as_t[1], as_t[2], factor=4.0, what=f"losses bn={bn}")


def test_error_barrier_counts_misclassified_inputs_along_the_path(pair):
    """The error barrier: endpoints are 1 - accuracy of the plain models; the batched pass counts the same
    errors as the loop at every alpha up to one input per float32 near-tie of the top two logits."""
    model, sa, sb, x, y = pair
    out = loss_barrier(model, sa, sb, x, y, alphas=5, batch_size=16)
    ref = loss_barrier_reference(model, sa, sb, x, y, alphas=5, batch_size=len(x))
    dg = disagreement(model, sa, sb, x, y)
    n = len(x)
    assert round(ref["error_a"] * n) == round((1 - dg["acc_a"]) * n)
    assert round(ref["error_b"] * n) == round((1 - dg["acc_b"]) * n)
    for e, r in zip(out["errors"], ref["errors"], strict=True):
        assert abs(e - r) * n <= 1
    chord = [(1 - a) * ref["error_a"] + a * ref["error_b"] for a in ref["alphas"]]
    assert ref["error_barrier"] == pytest.approx(max(e - c for e, c in zip(ref["errors"], chord, strict=True)),
                                                 abs=1e-12)
    assert ref["error_barrier"] >= 0
    same = loss_barrier_reference(model, sa, clone_state(sa), x, y, alphas=5, batch_size=20)
    assert same["error_barrier"] == 0.0


def test_barrier_endpoints_equal_plain_evaluation(pair):
    model, sa, sb, x, y = pair
    out = loss_barrier(model, sa, sb, x, y, alphas=3, batch_size=16)
    ref = loss_barrier_reference(model, sa, sb, x, y, alphas=3, batch_size=len(x))
    la, lb = direct_loss(model, sa, x, y), direct_loss(model, sb, x, y)
    assert ref["loss_a"] == pytest.approx(la, rel=64 * EPS64)  # same logits; float64 sums
    assert ref["loss_b"] == pytest.approx(lb, rel=64 * EPS64)
    assert abs(out["loss_a"] - la) <= loss_tol(la)
    assert abs(out["loss_b"] - lb) <= loss_tol(lb)


def test_barrier_explicit_alphas_still_evaluates_endpoints(pair):
    model, sa, sb, x, y = pair
    grid = loss_barrier(model, sa, sb, x, y, alphas=5, batch_size=24)
    out = loss_barrier(model, sa, sb, x, y, alphas=[0.5, 0.25], batch_size=24)
    assert out["alphas"] == [0.5, 0.25] and len(out["losses"]) == 2
    tol = loss_tol(*grid["losses"])
    assert abs(out["loss_a"] - grid["loss_a"]) <= tol and abs(out["loss_b"] - grid["loss_b"]) <= tol
    assert abs(out["losses"][0] - grid["losses"][2]) <= tol
    assert abs(out["losses"][1] - grid["losses"][1]) <= tol
    assert out["alpha_max"] in (0.5, 0.25)


def test_barrier_is_zero_on_a_convex_path(pair):
    # Only the linear head differs: the logits are affine in α and cross-entropy is convex
    # in the logits, so L(θ_α) lies on or below the chord and the max gap is the endpoints' 0.
    model, sa, sb, x, y = pair
    head = {k: (sb[k] if k.startswith("fc.") else v) for k, v in sa.items()}
    out = loss_barrier(model, sa, head, x, y, alphas=9, batch_size=48)
    assert out["loss_a"] != out["loss_b"]
    assert 0.0 <= out["barrier"] <= loss_tol(out["loss_a"], out["loss_b"])
    chord = [(1 - a) * out["loss_a"] + a * out["loss_b"] for a in out["alphas"]]
    interior = [lv - c for lv, c in zip(out["losses"][1:-1], chord[1:-1], strict=True)]
    assert max(interior) < 0  # strictly convex in between


def permuted_mlp():
    """A small MLP, its hidden-unit-permuted copy (the same function), data labelled by it."""
    torch.manual_seed(7)
    model = build_model("mlp", width=16, in_shape=(3, 4, 4)).eval()
    with torch.no_grad():
        model.fc3.weight.mul_(4)  # confident, so the endpoints have low loss
    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y = model(x).argmax(1)
    sa = model.state_dict()
    g = torch.Generator().manual_seed(9)
    p1, p2 = torch.randperm(16, generator=g), torch.randperm(16, generator=g)
    sb = dict(sa)
    sb["fc1.weight"], sb["fc1.bias"] = sa["fc1.weight"][p1], sa["fc1.bias"][p1]
    sb["fc2.weight"], sb["fc2.bias"] = sa["fc2.weight"][p2][:, p1], sa["fc2.bias"][p2]
    sb["fc3.weight"] = sa["fc3.weight"][:, p2]
    return model, sa, sb, x, y


def test_barrier_positive_between_permuted_copies():
    model, sa, sb, x, y = permuted_mlp()
    out = loss_barrier(model, sa, sb, x, y, alphas=11, batch_size=32)
    ref = loss_barrier_reference(model, sa, sb, x, y, alphas=11, batch_size=32)
    # Same function at both ends (up to summation order), very different weights.
    assert abs(out["loss_a"] - out["loss_b"]) <= loss_tol(out["loss_a"])
    assert param_dissimilarity(model, sa, sb)["dissimilarity"] > 0.1
    assert disagreement(model, sa, sb, x, y)["disagreement"] == 0.0
    # Averaging unmatched hidden units breaks the network in between.
    assert out["barrier"] > 0.1
    assert 0.0 < out["alpha_max"] < 1.0
    assert abs(out["barrier"] - ref["barrier"]) <= 2 * loss_tol(*ref["losses"])
    mid = out["losses"][5]
    assert mid - out["loss_a"] == pytest.approx(out["barrier"], abs=out["barrier"] * 0.5)


def test_recompute_differs_needs_data_and_ignores_stored_statistics(pair):
    model, sa, sb, x, y = pair
    bn_data = images(40, seed=3)
    with pytest.raises(ConfigError, match="bn_data"):
        loss_barrier(model, sa, sb, x, y, bn="recompute")
    with pytest.raises(ConfigError, match="bn_data"):
        loss_barrier_reference(model, sa, sb, x, y, bn="recompute")
    inter = loss_barrier(model, sa, sb, x, y, alphas=5, batch_size=20)
    rec = loss_barrier(model, sa, sb, x, y, alphas=5, batch_size=20, bn="recompute", bn_data=bn_data)
    assert max(abs(a - b) for a, b in zip(inter["losses"], rec["losses"], strict=True)) > 1e-3
    # The stored running statistics play no part in "recompute".
    gen = torch.Generator().manual_seed(11)
    other = {k: (torch.rand(v.shape, generator=gen) + 0.1 if "running" in k else v) for k, v in sa.items()}
    rec2 = loss_barrier(model, other, sb, x, y, alphas=5, batch_size=20, bn="recompute", bn_data=bn_data)
    assert rec2["losses"] == rec["losses"]


def test_recompute_endpoint_equals_cumulative_statistics(pair):
    # Independent of both code paths: torch's own momentum=None (cumulative average)
    # on the same batches, then eval mode.
    model, sa, sb, x, y = pair
    bn_data = images(40, seed=3)
    m = copy.deepcopy(model)
    m.load_state_dict(sb)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        for i in range(0, 40, 16):
            m(bn_data[i : i + 16])
        m.eval()
        expected = float(F.cross_entropy(m(x).double(), y))
    out = loss_barrier(model, sa, sb, x, y, alphas=2, batch_size=16, bn="recompute", bn_data=bn_data)
    assert abs(out["loss_b"] - expected) <= loss_tol(expected)
