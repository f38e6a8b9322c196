"""Tests for engine.metrics: parameter dissimilarity, loss barrier, disagreement."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.metrics import disagreement, loss_barrier, loss_barrier_reference, param_dissimilarity
from engine.models import build_model
from tests._tolerance import assert_close_to_torch

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
# vmap and the plain loop run the same float32 network with different kernels (batched
# matmuls / grouped convs vs plain ones), so their logits differ by a few float32 ulps
# of the logit scale; cross-entropy is 1-Lipschitz per logit in the sense
# |dL| <= max|dz| * ||softmax - onehot||_1 <= 2 max|dz|, so the losses then agree to a
# few ulps of the loss scale. 4 ulps leaves ample room (observed: < 0.2 ulp).
ULPS = 4


def loss_tol(*losses: float) -> float:
    return ULPS * EPS32 * max(1.0, *(abs(v) for v in losses))


# --------------------------------------------------------------------------- fixtures


def randomize_bn(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.num_batches_tracked.fill_(int(torch.randint(1, 100, (), generator=gen)))
    return model


def cnn(seed: int, width: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model("cnn", width=width), torch.Generator().manual_seed(seed + 1000))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labels(n: int, seed: int = 0, classes: int = 10) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def direct_loss(model: torch.nn.Module, state, x, y) -> float:
    """Mean cross-entropy of ``state`` loaded into a copy of ``model`` (eval mode)."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        return float(F.cross_entropy(m(x).double(), y))


def param_flat(model, state) -> torch.Tensor:
    return torch.cat([state[k].double().reshape(-1) for k, _ in model.named_parameters()])


@pytest.fixture(scope="module")
def pair():
    """Two distinct BN CNNs (width 4), their states, and tiny data."""
    ma, mb = cnn(0), cnn(1)
    return ma, ma.state_dict(), mb.state_dict(), images(48), labels(48)


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


# --------------------------------------------------------------------------- validation

CALLS = {
    "dissimilarity": lambda m, a, b, x, y: param_dissimilarity(m, a, b),
    "barrier": lambda m, a, b, x, y: loss_barrier(m, a, b, x, y, alphas=3),
    "reference": lambda m, a, b, x, y: loss_barrier_reference(m, a, b, x, y, alphas=3),
    "disagreement": lambda m, a, b, x, y: disagreement(m, a, b, x, y),
}


def one_line_error(fn, *args, match: str, **kw) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("call", CALLS)
def test_mismatched_states_name_the_key(pair, call):
    fn = CALLS[call]
    model, sa, sb, x, y = pair
    lacking = {k: v for k, v in sb.items() if k != "bn2.running_var"}
    one_line_error(fn, model, sa, lacking, x, y, match=r"^state_b lacks bn2\.running_var$")
    torch.manual_seed(0)
    wide = build_model("cnn", width=8).state_dict()  # a checkpoint of another model
    msg = one_line_error(fn, model, wide, sb, x, y, match=r"\(8,3,3,3\) vs \(4,3,3,3\) for conv1\.weight")
    assert msg.startswith("state_a")
    mlp_state = build_model("mlp", width=4).state_dict()
    one_line_error(fn, model, sa, mlp_state, x, y, match=r"^state_b lacks conv1\.weight$")
    one_line_error(fn, model, dict(sa, extra=torch.zeros(1)), sb, x, y, match=r"state_a has extra")
    one_line_error(fn, model, sa, dict(sb, **{"fc.bias": sb["fc.bias"].double()}), x, y, match=r"dtype .* fc\.bias")
    nan = dict(sb, **{"bn1.weight": sb["bn1.weight"] * float("nan")})
    one_line_error(fn, model, sa, nan, x, y, match=r"non-finite values in bn1\.weight")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(alphas=1), "at least 2"),
        (dict(alphas=0), "at least 2"),
        (dict(alphas=True), "alphas"),
        (dict(alphas=[]), "non-empty"),
        (dict(alphas=[0.5, 1.5]), r"\[0, 1\]"),
        (dict(alphas=[-0.1]), r"\[0, 1\]"),
        (dict(alphas=[float("nan")]), r"\[0, 1\]"),
        (dict(alphas=[[0.1, 0.2]]), "1-D"),
        (dict(alphas="abc"), "alphas"),
        (dict(bn="batch"), "bn must be one of interpolate, recompute"),
        (dict(bn="recompute"), "bn_data"),
        (dict(bn="recompute", bn_data=torch.zeros(0, 3, 32, 32)), "bn_data is empty"),
        (dict(bn="recompute", bn_data=torch.zeros(4, 3, 32, 32, dtype=torch.uint8)), "bn_data is uint8"),
        (dict(batch_size=0), "batch_size"),
    ],
)
@pytest.mark.parametrize("fn", [loss_barrier, loss_barrier_reference])
def test_barrier_argument_errors(pair, fn, kw, match):
    model, sa, sb, x, y = pair
    one_line_error(fn, model, sa, sb, x, y, match=match, **kw)


@pytest.mark.parametrize("fn", [loss_barrier, loss_barrier_reference, disagreement])
def test_data_errors(pair, fn):
    model, sa, sb, x, y = pair
    one_line_error(fn, model, sa, sb, x[:0], y[:0], match="x is empty")
    one_line_error(fn, model, sa, sb, x, y[:-1], match="x has 48 inputs but y has 47 labels")
    one_line_error(fn, model, sa, sb, x, y.float(), match="integer class labels")
    one_line_error(fn, model, sa, sb, (x * 50).clamp(0, 255).to(torch.uint8), y, match="normalize")
    one_line_error(fn, model, sa, sb, x, torch.full_like(y, 10), match="label 10 but the model has 10 outputs")
    one_line_error(fn, model, sa, sb, x, torch.full_like(y, -1), match="negative label")


# --------------------------------------------------------------------------- side effects


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_states_and_model_are_left_alone(pair, mode):
    model, sa, sb, x, y = pair
    model = copy.deepcopy(model).train(mode == "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a0, b0 = clone_state(sa), clone_state(sb)
    bn_data = images(20, seed=3)
    param_dissimilarity(model, sa, sb)
    for fn in (loss_barrier, loss_barrier_reference):
        fn(model, sa, sb, x, y, alphas=3, batch_size=20)
        fn(model, sa, sb, x, y, alphas=3, batch_size=20, bn="recompute", bn_data=bn_data)
        fn(model, sa, sa, x, y, alphas=3, bn="recompute", bn_data=bn_data)  # a state on both sides
    disagreement(model, sa, sb, x, y, batch_size=20)
    for s, s0 in ((sa, a0), (sb, b0)):
        assert s.keys() == s0.keys() and all(torch.equal(s[k], s0[k]) for k in s0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.training == (mode == "train") for m in model.modules())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_matches_cpu(pair):
    model, sa, sb, x, y = pair  # template and data stay on the CPU; the states decide
    cuda = [{k: v.cuda() for k, v in s.items()} for s in (sa, sb)]
    bn_data = images(40, seed=3)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would round to 10 bits
    try:
        for kw in (dict(), dict(bn="recompute", bn_data=bn_data)):
            cpu = loss_barrier(model, sa, sb, x, y, alphas=5, batch_size=20, **kw)
            for fn in (loss_barrier, loss_barrier_reference):
                gpu = fn(model, *cuda, x, y, alphas=5, batch_size=20, **kw)
                tol = 8 * loss_tol(*cpu["losses"])
                for lc, lg in zip(cpu["losses"], gpu["losses"], strict=True):
                    assert abs(lc - lg) <= tol, (fn.__name__, kw.keys(), lc, lg)
        same = loss_barrier(model, cuda[0], cuda[0], x, y, alphas=5, batch_size=20)
        assert 0.0 <= same["barrier"] <= loss_tol(same["loss_a"])
        dc, dg = param_dissimilarity(model, sa, sb), param_dissimilarity(model, *cuda)
        for k in dc:
            assert dg[k] == pytest.approx(dc[k], rel=1e-12)
        assert param_dissimilarity(model, cuda[0], cuda[0])["dissimilarity"] == 0.0
        assert disagreement(model, *cuda, x, y, batch_size=20) == disagreement(model, sa, sb, x, y, batch_size=20)
        assert all(v.device.type == "cuda" for v in cuda[0].values())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
