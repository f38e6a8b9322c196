"""Divergence traces and growth rates: constructed traces give their rates back, the fleet's
device traces match the metrics (control exactly 0), and the study's guards and spreads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.analysis import (
    centred_alignment,
    effective_rank,
    growth_rate,
    growth_rate_grid,
    growth_rates,
    growth_transition,
    label_gram,
    traced,
    window_values,
)
from engine.errors import ConfigError
from tests.seeding import seeded


def _trace(t0, rate, t_end, every, d0=1e-7, noise=None):
    t = np.arange(t0, t_end + 1, every, dtype=np.float64)
    d = d0 * np.exp(rate * (t - t0))
    if noise is not None:
        d = d * np.exp(noise[:len(t)])
    return {"member": "perturbed", "t0": t0, "t": t.tolist(), "l2": d.tolist(), "dissimilarity": (d ** 2).tolist()}


def test_constructed_traces_give_their_growth_rates_back():
    g, seed = seeded()
    rates = {0: 0.05, 10: 0.031, 50: 0.004, 100: -0.002, 200: -0.01}
    traces = [_trace(t0, r, 400, 5) for t0, r in rates.items()]
    traces.append({"member": "control", "t0": 0, "t": [0, 5], "l2": [0.0, 0.0], "dissimilarity": [0.0, 0.0]})
    got = growth_rates(traces, window=100)
    assert set(got) == set(rates), seed
    for t0, r in rates.items():
        assert got[t0] == pytest.approx(r, rel=1e-9, abs=1e-12), (t0, seed)
    # dissimilarity ~ d² grows twice as fast
    assert growth_rates(traces, 100, "dissimilarity")[10] == pytest.approx(2 * 0.031, rel=1e-9)
    # The growth rule: first t0 (from the fastest on) with λ ≤ 0.
    t0s = sorted(got)
    assert growth_transition(t0s, [got[t] for t in t0s]) == 100
    assert growth_transition(t0s, [got[t] for t in t0s], stop=0.01) == 50
    assert growth_transition([0, 10], [0.1, 0.2]) is None          # grows everywhere: no transition
    # Noisy traces: the least-squares slope recovers the rate within the noise's standard error.
    noise = torch.randn(200, generator=g, dtype=torch.float64).numpy() * 0.05
    tr = _trace(0, 0.02, 995, 5, noise=noise)
    lam = growth_rate(tr["t"], tr["l2"], 0, 500)
    assert abs(lam - 0.02) < 5 * 0.05 / (500 * math.sqrt(101 / 12)), (lam, seed)
    # Windows ending at each t1, and the fixed-window value (log-linear between points).
    t0g, t1g, m = growth_rate_grid(traces, [50, 300])
    assert t0g == t0s and t1g == [50, 300]
    assert m[0, 0] == pytest.approx(0.05) and math.isnan(m[t0s.index(50), 0]) and m[-1, 1] == pytest.approx(-0.01)
    w = window_values(traces, 102)  # between trace points 100 and 105
    assert w[0] == pytest.approx(1e-7 * math.exp(0.05 * 102), rel=1e-9)
    assert math.isnan(window_values(traces, 300)[200])  # runs past the end of the trace
    assert math.isnan(growth_rates(traces, 300)[200])
    with pytest.raises(ConfigError, match="window"):
        growth_rates(traces, 0)


def test_kernel_label_alignment_and_effective_rank():
    y = np.array([0, 0, 1, 1, 2, 2])
    l = label_gram(y, 3)
    assert centred_alignment(l, l) == pytest.approx(1.0)
    assert centred_alignment(l + 5.0, l) == pytest.approx(1.0)   # centring removes a constant offset
    assert abs(centred_alignment(np.eye(6), l)) < 1.0
    full = np.kron(l, np.eye(3))   # rows n·C + c, outputs independent
    np.testing.assert_allclose(traced(full, 3), 3 * l)
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert effective_rank([4.0, 0, 0, -1e-12]) == pytest.approx(1.0)


def test_study_guards_decay_in_window_warns_and_two_seeds_give_a_spread():
    from engine.report import lr_changes, transition_entry
    from engine.report.document import guard_sentences
    from engine.train import TrainConfig

    changes = lr_changes(TrainConfig(steps=600, schedule="multistep"))
    assert changes == [300, 450]
    assert lr_changes(TrainConfig(steps=600, schedule="constant")) == []
    grid = [0, 10, 30, 100, 300]
    near = transition_entry("chaos_dissimilarity", [300, 300], grid, changes, "d")
    assert near["coincides_with_lr_change"] and near["at_grid_edge"] and near["spread"] == 0.0
    spread = transition_entry("cone", [150, 200], [0, 50, 150, 200, 600], [], "c")
    assert spread["iteration"] == 175 and spread["spread"] == pytest.approx(math.sqrt(1250))
    assert not spread["coincides_with_lr_change"] and not spread["at_grid_edge"]
    one = transition_entry("cone", [150], [0, 150, 600], [], "c")
    assert one["spread"] is None
    none = transition_entry("sensitivity_growth", [None, None], grid, changes, "g")
    assert none["iteration"] is None and not none["coincides_with_lr_change"]
    record = {"lr_changes": changes, "lr_near_factor": 2.0, "chaos": {"t0": grid, "t1": [100, 600]},
              "train": {"checkpoints": [0, 600]}, "transitions": [near, spread]}
    words = " ".join(guard_sentences(record))
    assert "cannot be attributed to the training dynamics" in words and "[300, 450]" in words
    assert "first or last point of its grid" in words
    assert guard_sentences({**record, "lr_changes": [], "transitions": [spread]}) == []


def test_a_window_that_ends_between_trace_points_still_counts():
    tr = [_trace(4, 0.03, 300, 5)]   # points 4, 9, ..., 104, 109: the window [4, 104] ends on one
    ts = (4, 10, 20, 100, 110)
    tr2 = [{**tr[0], "t": list(ts), "l2": [1e-7 * math.exp(0.03 * (t - 4)) for t in ts]}]
    assert growth_rates(tr, 100)[4] == pytest.approx(0.03, rel=1e-9)
    assert growth_rates(tr2, 100)[4] == pytest.approx(0.03, rel=1e-9)   # [4, 104] has no point at 104
    assert math.isnan(growth_rates(tr2, 200)[4])                          # the trace stops at 110
