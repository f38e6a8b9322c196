"""The per-layer contraction planner (engine/ntk/planner.py) and `entk plan`.

The pair cost model is checked against the multiply-adds the op actually issues (its batched
products and the weighted sum, counted by intercepting torch), the choice on layers whose cheaper
side is known by construction, the floor's parts against each other, and the CLI's table, JSON
and exit codes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from engine.cli import main
from engine.errors import ConfigError
from engine.ntk import plan
from engine.ntk.pairs import conv_geometry, conv_operands, pair_gram
from engine.ntk.planner import Cost, materialise_cost, pairs_cost
from tests.seeding import seeded


class _Count(TorchFunctionMode):
    """Multiply-adds of torch.bmm, and elements of the in-place products (the weighted sum)."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.bmm:
            b, m, k = args[0].shape
            self.macs += b * m * k * args[1].shape[2]
        elif func is torch.Tensor.mul_:
            self.macs += out.numel()
        return out


@pytest.mark.parametrize("kind", ["full", "traced", "diagonal"])
@pytest.mark.parametrize("groups", [1, 3])
def test_pair_cost_counts_the_products_the_op_issues(kind, groups):
    g, seed = seeded()
    conv = nn.Conv2d(6, 9, 3, stride=2, padding=1, groups=groups)
    na, nb, k = 5, 3, 4
    xa, xb = torch.randn(na, 6, 7, 5, generator=g), torch.randn(nb, 6, 7, 5, generator=g)
    ya = conv(xa)
    ga, gb = torch.randn(na, k, *ya.shape[1:], generator=g), torch.randn(nb, k, *ya.shape[1:], generator=g)
    geom = conv_geometry(conv, xa, ya)
    assert (geom.groups, geom.d, geom.co, geom.t) == (groups, 6 // groups * 9, 9 // groups, 4 * 3)
    pa, pga = conv_operands(conv, xa, ga)
    out = torch.zeros({"full": (na * k, nb * k), "traced": (na, nb), "diagonal": (na, k, k)}[kind])
    cross = () if kind == "diagonal" else conv_operands(conv, xb, gb)
    with _Count() as count:
        pair_gram(out, kind, pa, pga, *cross)
    want = pairs_cost(kind, na, nb, k, False, geom).macs
    assert count.macs == want, f"seed {seed}: the op issued {count.macs} multiply-adds, the model says {want}"


def test_materialise_cost_counts_formation_and_gram():
    geom = conv_geometry(nn.Conv2d(4, 8, 3), torch.zeros(1, 4, 5, 5), torch.zeros(1, 8, 3, 3))
    cols = geom.weight_numel + 8
    c = materialise_cost("full", 6, 4, 3, False, cols, geom)
    assert c.macs == (6 + 4) * 3 * geom.forward_macs + 6 * 3 * 4 * 3 * cols
    sym = materialise_cost("full", 6, 6, 3, True, cols, geom)
    assert sym.macs == 6 * 3 * geom.forward_macs + 18 * 19 // 2 * cols  # upper triangle of 18 rows
    assert materialise_cost("traced", 6, 4, 3, False, cols, None).macs == 6 * 4 * 3 * cols


class Net(nn.Module):
    """A wide conv on a 2x2 map (pairs are cheaper) after a narrow conv on a 16x16 map (columns are)."""

    def __init__(self, c: int = 10):
        super().__init__()
        self.early = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(8)
        self.late = nn.Conv2d(4, 256, 1)
        self.wide = nn.Conv2d(256, 256, 3, padding=1)
        self.fc = nn.Linear(256, c)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.early(x))))
        return self.fc(self.wide(torch.relu(self.late(h))).mean((2, 3)))


def test_auto_picks_the_cheaper_side_and_the_floor_adds_up():
    model = Net().eval()
    x = torch.zeros(16, 3, 16, 16)
    p = plan(model, x)
    s = p.strategies()
    assert s["early"] == "materialise" and s["wide"] == "pairs" and s["fc"] == "pairs" and s["bn"] == "materialise"
    for lc in p.layers:
        if lc.pairs is not None:
            assert lc.chosen.seconds() == min(lc.materialise.seconds(), lc.pairs.seconds()), lc.name
    assert p.floor == sum((lc.chosen for lc in p.layers), Cost(p.backward_macs, 0))
    assert p.floor.macs < p.materialise_everywhere.macs
    # Backward-data passes: K outputs x every conv/linear call whose input needs a gradient (not `early`).
    fwd = 4 * 256 * 4 + 256 * 9 * 256 * 4 + 256 * 10
    assert p.backward_macs == 16 * 10 * fwd
    forced = plan(model, x, contraction="materialise")
    assert set(forced.strategies().values()) == {"materialise"}
    assert forced.floor == forced.materialise_everywhere
    pairs = plan(model, x, contraction="pairs").strategies()
    assert pairs["early"] == "pairs" and pairs["bn"] == "materialise"  # a norm has no pair form


def test_kinds_cross_tiles_bfloat16_and_errors():
    model = Net(3).eval()
    x1, x2 = torch.zeros(5, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    full = plan(model, x1, x2)
    assert (full.n1, full.n2, full.k) == (5, 2, 3)
    assert plan(model, x1, kernel="pntk").k == 1
    traced = plan(model, x1, x2, kernel="traced")
    assert traced.materialise_everywhere.macs < full.materialise_everywhere.macs
    bf = plan(model, x1, x2, compute_dtype=torch.bfloat16)
    assert bf.itemsize == 2 and bf.materialise_everywhere.bytes < full.materialise_everywhere.bytes
    with pytest.raises(ConfigError, match="kernel must be one of"):
        plan(model, x1, kernel="trace")
    with pytest.raises(ConfigError, match="no cross-kernel"):
        plan(model, x1, x2, kernel="diagonal")
    with pytest.raises(ConfigError, match="contraction must be one of"):
        plan(model, x1, contraction="ghost")


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "vgg11", "--n", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "floor (backward + per-layer best)" in text and "features.0" in text and "pairs" in text
    rec = json.loads(out.read_text())
    assert rec["command"] == "plan" and rec["n1"] == 8 and rec["k"] == 10
    layers = {r["name"]: r for r in rec["layers"]}
    assert layers["features.0"]["strategy"] == "materialise" and layers["classifier"]["strategy"] == "pairs"
    chosen = sum(r[r["strategy"]]["macs"] for r in rec["layers"])
    assert rec["floor"]["macs"] == rec["backward_macs"] + chosen
    assert math.isclose(sum(r["materialise"]["macs"] for r in rec["layers"]) + rec["backward_macs"],
                        rec["materialise_everywhere"]["macs"])


@pytest.mark.parametrize(("argv", "needle"), [(["--n", "0"], "--n and --n2 must be >= 1"),
                                              (["--kernel", "diagonal", "--n2", "3"], "no cross-kernel"),
                                              (["--input-shape", "3,x"], "comma-separated sizes")])
def test_cli_usage_errors_exit_2(argv, needle, capsys):
    assert main(["plan", *argv]) == 2
    assert needle in capsys.readouterr().err
