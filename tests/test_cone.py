"""The cone analysis on constructed kernel trajectories whose geometry is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from engine.analysis.chaos import chaos_transition
from engine.analysis.cone import (
    analyze_cone,
    classical_mds,
    half_angle,
    reference_curves,
    suffix_half_angles,
    velocity_curves,
)
from engine.errors import ConfigError

EPS = np.finfo(np.float64).eps
D = 50                      # kernels are 5x10 matrices, i.e. vectors in R^50
SHAPE = (5, 10)


def _gram(vectors, scales=None):
    """Gram of kernels H_t = scale_t · reshape(v_t): ⟨H_i, H_j⟩_F from flattened matrices."""
    v = np.asarray(vectors, dtype=np.float64)
    s = np.ones(len(v)) if scales is None else np.asarray(scales, dtype=np.float64)
    h = np.stack([(si * vi).reshape(SHAPE) for si, vi in zip(s, v, strict=True)])
    flat = h.reshape(len(h), -1)
    return flat @ flat.T


def _e(k):
    e = np.zeros(D)
    e[k] = 1.0
    return e


def _cone_vectors(beta, n_pairs, axis=0):
    """2·n_pairs unit vectors at angle exactly beta from e_axis: axis·cosβ ± sinβ·e_k (mean = axis)."""
    out = []
    for k in range(1, n_pairs + 1):
        for sign in (1.0, -1.0):
            out.append(np.cos(beta) * _e(axis) + sign * np.sin(beta) * _e(axis + k))
    return np.array(out)


def _angle_tol(smallest_angle):
    # arccos amplifies a cosine's rounding by 1/sin(angle); a Gram entry of kernels in R^D
    # carries a relative error of a few D·eps.
    return 1e3 * EPS * D / np.sin(smallest_angle)


def test_identical_kernels():
    t = 6
    rng = np.random.default_rng(0)
    v = rng.standard_normal(D)
    g = _gram(np.tile(v, (t, 1)))          # same kernel, unit scale: every entry bit-identical
    a = analyze_cone(np.arange(t) * 10, g)
    assert np.all(a.distance == 0)
    assert np.all(a.angle == 0)
    assert half_angle(g) == 0
    assert np.all(a.polar_angle == 0)
    np.testing.assert_array_equal(a.polar_radius, np.ones(t))
    assert a.cone_half_angle == 0
    assert a.transition_index == 0 and a.transition_iteration == 0


def test_identical_directions_different_scales():
    t = 6
    v = np.random.default_rng(1).standard_normal(D)
    scales = 10.0 ** np.linspace(0, 3, t)
    g = _gram(np.tile(v, (t, 1)), scales)
    a = analyze_cone(np.arange(t), g)
    tol = 1e3 * EPS * D
    assert np.abs(a.distance).max() <= tol
    assert np.abs(a.angle).max() <= np.sqrt(2 * tol)   # angle ≈ sqrt(2 S) at S → 0
    np.testing.assert_allclose(a.polar_radius, scales / scales[0], rtol=tol)
    np.testing.assert_allclose(a.norms, scales * np.linalg.norm(v), rtol=tol)


@pytest.mark.parametrize("beta", [0.05, 0.3, 1.0])
def test_half_angle_of_a_cone(beta):
    v = _cone_vectors(beta, n_pairs=6)
    scales = 10.0 ** np.linspace(-2, 2, len(v))          # the scale of a kernel must not matter
    g = _gram(v, scales)
    assert abs(half_angle(g) - beta) <= _angle_tol(beta)
    # every suffix that still holds a ± pair has the axis as its mean; the last one is a single kernel
    s = suffix_half_angles(g)
    assert abs(s[-1]) <= np.sqrt(1e3 * EPS * D)
    pairs_start = np.arange(0, len(v), 2)
    np.testing.assert_allclose(s[pairs_start], beta, atol=_angle_tol(beta))


def test_transition_at_start_of_cone():
    beta = 0.1
    # free rotation toward the cone's axis e0 in the (e0, e_{D-1}) plane: 1.5, 1.2, 0.9, 0.6 rad away
    early = [np.cos(p) * _e(0) + np.sin(p) * _e(D - 1) for p in (1.5, 1.2, 0.9, 0.6)]
    cone = _cone_vectors(beta, n_pairs=5)
    v = np.vstack([early, cone])
    c = len(early)
    iterations = np.array([0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000])
    scales = 1.0 + np.log1p(iterations)
    a = analyze_cone(iterations, _gram(v, scales), rho=0.3)
    assert a.suffix_half_angle[c - 1] > 0.3 * a.suffix_half_angle[0] >= beta   # the test's premise
    assert a.transition_index == c
    assert a.transition_iteration == iterations[c]
    assert abs(a.cone_half_angle - beta) <= _angle_tol(beta)
    assert "rho = 0.3" in a.rule
    np.testing.assert_allclose(a.polar_radius, scales / scales[0], rtol=1e3 * EPS * D)
    # polar angle of the early points is the rotation from H_0 (which sits 1.5 rad from e0)
    np.testing.assert_allclose(a.polar_angle[:c], [0.0, 0.3, 0.6, 0.9], atol=_angle_tol(0.3))


def test_free_rotation_has_no_narrow_cone():
    t, omega = 40, 0.05
    phi = omega * np.arange(t)
    v = np.cos(phi)[:, None] * _e(3) + np.sin(phi)[:, None] * _e(7)
    iterations = 3 * np.arange(t) + 2
    rho = 0.5
    a = analyze_cone(iterations, _gram(v, np.linspace(1, 4, t)), rho=rho)
    tol = _angle_tol(omega)
    # S(t, t+k) is the same for every t, and S/dt = S / (3k)
    for k, (ts, s, rate) in velocity_curves(a, lags=(1, 2, 4)).items():
        assert len(ts) == t - k
        np.testing.assert_allclose(s, 1 - np.cos(k * omega), atol=1e3 * EPS * D)
        np.testing.assert_allclose(rate, s / (3 * k), rtol=1e3 * EPS * D)
    # the angle to a reference kernel grows linearly in the number of steps
    for tau, (ts, s) in reference_curves(a, [iterations[0], iterations[10], iterations[25]]).items():
        assert ts[0] == tau
        ang = np.arccos(1 - s)
        np.testing.assert_allclose(ang[1:], omega * (ts[1:] - tau) / 3, atol=tol)
    np.testing.assert_allclose(a.polar_angle, phi, atol=tol)
    # whole trajectory: a 1.95 rad arc, half-angle 0.975; no narrow cone: the rule fires only
    # once the remaining arc has shrunk to rho of the whole, roughly (1 − rho)·T steps in
    assert abs(a.suffix_half_angle[0] - omega * (t - 1) / 2) <= tol
    assert abs(a.transition_index - (1 - rho) * t) <= 1
    assert a.cone_half_angle >= rho * a.suffix_half_angle[0] - omega
    assert np.degrees(a.cone_half_angle) > 25
    # MDS of the angles of points on an arc lies on a line (the arc length is the distance)
    x = a.mds
    np.testing.assert_allclose(np.linalg.norm(x[:, None] - x[None], axis=-1), a.angle, atol=tol)


def test_classical_mds_recovers_planar_distances():
    rng = np.random.default_rng(2)
    p = rng.standard_normal((12, 2)) * [3.0, 1.0]
    dist = np.linalg.norm(p[:, None] - p[None], axis=-1)
    x = classical_mds(dist, 2)
    assert x.shape == (12, 2)
    got = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.testing.assert_allclose(got, dist, atol=1e3 * EPS * dist.max() * len(p))
    # extra dimensions of a planar set are zero; dimensions beyond T are padded
    x3 = classical_mds(dist, 3)
    assert np.abs(x3[:, 2]).max() <= np.sqrt(1e3 * EPS) * dist.max()
    assert classical_mds(dist[:2, :2], 4).shape == (2, 4)


def test_chaos_transition():
    t0s = [0, 10, 30, 100, 300]
    v = 10.0 ** np.array([-1, -1, -2, -5, -5])
    assert chaos_transition(t0s, v) == 100            # geometric midpoint 1e-3
    assert chaos_transition(t0s, v, frac=0.25) == 30   # 10^-2
    assert chaos_transition(t0s, v, frac=1.0) == 100   # the late level itself
    assert chaos_transition(t0s[::-1], v[::-1]) == 100  # order of the input does not matter
    # search starts at the maximum: an early low value (before chaos sets in) is no transition
    assert chaos_transition(t0s, [1e-6, 1e-1, 1e-2, 1e-5, 1e-5]) == 100
    # non-finite and non-positive values are ignored
    assert chaos_transition(t0s, [np.nan, 1e-1, 0.0, 1e-5, 1e-5]) == 100


@pytest.mark.parametrize("values", [[np.nan, 1e-3, 0, -1, np.inf], [1e-3], [], [1e-3, 1e-3, 1e-3]])
def test_chaos_transition_degenerate(values):
    assert chaos_transition(list(range(len(values))), values) is None


def test_errors():
    v = _cone_vectors(0.2, 2)
    g = _gram(v)
    with pytest.raises(ConfigError, match="square"):
        analyze_cone([0, 1, 2], g[:3])
    with pytest.raises(ConfigError, match="must match"):
        analyze_cone([0, 1, 2], g)
    with pytest.raises(ConfigError, match=r"strictly increasing.*5 then 3"):
        analyze_cone([0, 5, 3, 9], g)
    with pytest.raises(ConfigError, match="at least 2"):
        analyze_cone([0], g[:1, :1])
    bad = g.copy()
    bad[2, :] = bad[:, 2] = 0
    with pytest.raises(ConfigError, match="kernel 2 is zero"):
        analyze_cone([0, 1, 2, 3], bad)
    bad = g.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ConfigError, match="non-finite"):
        analyze_cone([0, 1, 2, 3], bad)
    bad = g.copy()
    bad[0, 1] += 0.5
    with pytest.raises(ConfigError, match="not symmetric"):
        analyze_cone([0, 1, 2, 3], bad)
    with pytest.raises(ConfigError, match="rho"):
        analyze_cone([0, 1, 2, 3], g, rho=0)
    a = analyze_cone([0, 1, 2, 3], g)
    with pytest.raises(ConfigError, match=r"reference iteration 7 is not a checkpoint \(available: \[0, 1, 2, 3\]\)"):
        reference_curves(a, [1, 7])
    with pytest.raises(ConfigError, match="lags"):
        velocity_curves(a, [0])
    assert len(velocity_curves(a, [4])[4][0]) == 0
    with pytest.raises(ConfigError, match="must match"):
        chaos_transition([0, 1], [1.0])
