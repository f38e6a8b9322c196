"""Learning-rate schedules and checkpoint-iteration specs."""

from __future__ import annotations

import itertools
import math

import pytest

from engine.errors import ConfigError
from engine.train.schedule import lr_at, parse_iterations


def test_multistep_default_recipe():
    kw = {"lr": 0.1, "steps": 1000, "schedule": "multistep"}
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(499, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.01)
    assert lr_at(749, **kw) == pytest.approx(0.01)
    assert lr_at(750, **kw) == pytest.approx(0.001)
    # Absolute milestones.
    assert lr_at(30, lr=1.0, steps=100, milestones=(30, 60), gamma=0.5) == pytest.approx(0.5)


def test_cosine_endpoints_and_monotone():
    lrs = [lr_at(s, lr=0.2, steps=101, schedule="cosine") for s in range(102)]
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[101] == pytest.approx(0.0, abs=1e-12)
    assert lrs[50] == pytest.approx(0.1, rel=0.02)
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_warmup_ramps_linearly_into_schedule():
    lrs = [lr_at(s, lr=0.1, steps=100, schedule="constant", warmup_steps=10) for s in range(12)]
    assert lrs[0] == pytest.approx(0.01) and lrs[4] == pytest.approx(0.05)
    assert lrs[9] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)
    c = lr_at(10, lr=0.1, steps=110, schedule="cosine", warmup_steps=10)
    assert c == pytest.approx(0.1)  # cosine starts after warm-up


def test_unknown_schedule():
    with pytest.raises(ConfigError, match="bogus"):
        lr_at(0, lr=0.1, steps=10, schedule="bogus")


def test_parse_iterations():
    assert parse_iterations("0,1,2,5,10", 20) == [0, 1, 2, 5, 10, 20]
    assert parse_iterations("every:25", 100) == [0, 25, 50, 75, 100]
    log = parse_iterations("log:5", 10000)
    assert log[0] == 0 and log[-1] == 10000 and 1 in log
    ratios = [b / a for a, b in itertools.pairwise(log[1:])]
    assert all(math.isclose(r, 10, rel_tol=0.01) for r in ratios)  # 1, 10, 100, 1000, 10000
    assert parse_iterations("", 7) == [7]


@pytest.mark.parametrize("spec,match", [("0,abc", "abc"), ("0,50", r"\[50\]"), ("log:0", "log:0")])
def test_parse_iterations_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_iterations(spec, 20)
