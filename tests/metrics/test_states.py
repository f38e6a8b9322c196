"""engine.metrics.states: every metric refuses bad states and inputs in one line, and leaves
the model and the states alone."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.errors import ConfigError
from engine.metrics import disagreement, loss_barrier, loss_barrier_reference, param_dissimilarity
from engine.models import build_model
from tests.metrics._common import clone_state, images, loss_tol

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
