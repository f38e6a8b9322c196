"""The chaos_basin rule: which basin the twins end in, read against the independent pair."""

from __future__ import annotations

import math

import pytest

from engine.analysis import BASIN_FRAC, basin_transition, basin_values
from engine.errors import ConfigError


def test_first_t0_from_which_every_twin_stays_inside():
    t0s = [0, 10, 40, 150, 400]
    # 10% of 2.0 is 0.2: t0 = 10 dips inside, t0 = 40 is out again, from 150 on inside for good.
    assert basin_transition(t0s, [1.8, 0.1, 0.5, 0.2, 0.01], 2.0) == 150
    assert basin_transition(t0s, [0.0, 0.0, 0.0, 0.0, 0.0], 2.0) == 0           # one basin from the first t0
    assert basin_transition(t0s, [1.8, 1.7, 1.5, 1.0, 0.3], 2.0) is None        # the last twin is still out
    assert basin_transition(t0s, [1.8, 1.7, math.nan, 0.1, 0.1], 2.0) == 150    # NaN (not computed) skipped
    assert basin_transition([400, 0, 150], [0.0, 1.0, 0.1], 1.0) == 150         # order of the grid does not matter
    assert basin_transition(t0s, [1.8, 0.1, 0.5, 0.2, 0.21], 2.0) is None       # just above the threshold


@pytest.mark.parametrize("ref", [0.0, -0.1, math.nan, math.inf])
def test_no_scale_without_a_separated_reference(ref):
    assert basin_transition([0, 10], [0.0, 0.0], ref) is None


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="must match"):
        basin_transition([0, 10], [1.0], 1.0)
    with pytest.raises(ConfigError, match="frac"):
        basin_transition([0], [0.0], 1.0, frac=1.5)
    assert 0 < BASIN_FRAC < 1


def test_basin_values_split_twins_and_references_at_a_t1():
    recs = [{"t0": 0, "t1": 5, "member": "perturbed", "barrier_test": 0.5},
            {"t0": 0, "t1": 9, "member": "perturbed", "barrier_test": 0.7},
            {"t0": 3, "t1": 9, "member": "perturbed", "barrier_test": 0.01},
            {"t0": 0, "t1": 9, "member": "control", "barrier_test": 0.0},
            {"t0": 3, "t1": 9, "member": "control", "barrier_test": 0.0},
            {"t0": 0, "t1": 9, "member": "independent", "barrier_test": 1.5},
            {"t0": 0, "t1": 5, "member": "independent", "barrier_test": 1.2},
            {"t0": 3, "t1": 9, "member": "spawn", "barrier_test": 0.9}]
    twins, ref, spawn = basin_values(recs)
    assert twins == {0: 0.7, 3: 0.01} and ref == 1.5 and spawn == {3: 0.9}
    twins, ref, spawn = basin_values(recs, t1=5)
    assert twins == {0: 0.5} and ref == 1.2 and spawn == {}
    _, ref, _ = basin_values([r for r in recs if r["member"] != "independent"])
    assert math.isnan(ref)
