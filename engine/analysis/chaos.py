"""Chaos Effect analysis (arXiv 2505.13900, Fig. 3) of the chaos grid's records
(:mod:`engine.jobs.chaos` writes them): the (t0, t1) grids of a metric and the chaos transition.

Basin rule (basin_values, basin_transition: the paper's question). The twin's test loss barrier
to the base at the last t1, per t0, against the barrier between the base and an independent run
(another initialisation): chaos_basin is the first t0 from which every twin stays at or below
BASIN_FRAC (0.1) of it. The rules below measure in-basin sensitivity (the study calls them
sensitivity_*): growth inside one basin is expected, so they do not locate the transition.

Transition rule (the Chaos Effect, chaos_transition). Given one chaos metric per
perturbation time t0 (e.g. the twins' parameter dissimilarity at the last compared
iteration t1), the early level is the largest value and the late level the value at
the last t0. The chaos transition is the first t0, from the one with the largest value
on, whose value is at or below the geometric interpolation, a fraction frac (default
0.5) of the way from the early to the late level in log space:
value ≤ exp((1 − frac)·log(early) + frac·log(late)). Only finite positive values count;
with fewer than two of them, or no decrease from the early to the late level, there is
no transition (None).

Growth rates (growth_rate, growth_rates, growth_transition). The chaos job records each
twin's L2 distance d(t0, t) to the base every few steps (the divergence trace). The
finite-time growth rate λ(t0) is the least-squares slope of log d over the fixed window
[t0, t0 + Δ] (per iteration; d ∝ exp(λ t)); growth_rate_grid gives it over [t0, t1] for
each t1. Unlike a comparison at one absolute t1, a fixed window gives every t0 the same
time to diverge. The growth transition is the first t0, from the one with the largest λ
on, with λ(t0) ≤ 0: from there on a perturbation no longer grows over Δ steps. None when
perturbations grow at every t0 of the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

_EPS = np.finfo(np.float64).eps


def chaos_transition(t0s, values, *, frac: float = 0.5) -> int | None:
    """The first t0 at or below the geometric interpolation between the early and late levels.

    ``values[k]`` is a chaos metric for perturbation time ``t0s[k]`` (e.g. the twins'
    dissimilarity at the last t1). Early level: the largest value; late level: the value
    at the last t0. Searching from the t0 of the largest value on, return the first t0
    whose value ≤ exp((1 − frac)·log(early) + frac·log(late)). Only finite positive values
    count; None with fewer than two of them or when late ≥ early (no decrease).
    """
    t0 = np.asarray(t0s, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if t0.shape != v.shape:
        raise ConfigError(f"{len(t0)} t0 values but {len(v)} metric values; they must match")
    if not (np.isfinite(frac) and 0 <= frac <= 1):
        raise ConfigError(f"frac must be in [0, 1], got {frac}")
    ok = np.isfinite(v) & (v > 0) & np.isfinite(t0)
    t0, v = t0[ok], v[ok]
    if len(v) < 2:
        return None
    order = np.argsort(t0, kind="stable")
    t0, v = t0[order], v[order]
    early, late = v.max(), v[-1]
    if not late < early:
        return None
    thr = np.exp((1 - frac) * np.log(early) + frac * np.log(late))
    start = int(np.argmax(v))
    hit = np.flatnonzero(v[start:] <= thr * (1 + 4 * _EPS))
    return int(t0[start + hit[0]])


def chaos_transition_of(records: Sequence[dict], field_name: str = "dissimilarity") -> tuple[int | None, dict]:
    """The chaos transition t0 (:func:`chaos_transition`) of the perturbed
    twins' ``field_name`` at the largest t1, and those values by t0."""
    last_t1 = max(r["t1"] for r in records)
    per_t0 = {r["t0"]: r[field_name] for r in records if r["member"] == "perturbed" and r["t1"] == last_t1}
    t0s = sorted(per_t0)
    return chaos_transition(t0s, [per_t0[t] for t in t0s]), per_t0


def chaos_grid(records: Sequence[dict], field_name: str, member: str = "perturbed") -> tuple[list, list, np.ndarray]:
    """Records → (t0 values, t1 values, matrix[t0, t1]) with NaN where t1 < t0."""
    t0s = sorted({r["t0"] for r in records})
    t1s = sorted({r["t1"] for r in records})
    m = np.full((len(t0s), len(t1s)), np.nan)
    for r in records:
        if r["member"] == member:
            m[t0s.index(r["t0"]), t1s.index(r["t1"])] = r[field_name]
    return t0s, t1s, m


# --------------------------------------------------------------------------- growth of the divergence


def _perturbed_traces(traces: Sequence[dict], field_name: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    if field_name not in ("l2", "dissimilarity"):
        raise ConfigError(f"trace field must be 'l2' or 'dissimilarity', got {field_name!r}")
    out = {}
    for r in traces:
        if r["member"] == "perturbed":
            out[int(r["t0"])] = (np.asarray(r["t"], dtype=np.float64), np.asarray(r[field_name], dtype=np.float64))
    return dict(sorted(out.items()))


def growth_curves(traces: Sequence[dict], field_name: str = "l2") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The growth curve d(t0, t) of every perturbed twin: ``{t0: (t, d)}`` from the summary's ``trace``."""
    return _perturbed_traces(traces, field_name)


def growth_rate(t, d, start: float, end: float) -> float:
    """Finite-time growth rate: the least-squares slope of log d against t over start ≤ t ≤ end.

    Per iteration (d grows like exp(λ t)). Only finite positive d count; NaN with fewer
    than two such points or when the trace stops before ``end`` (the window is cut off).
    """
    t, d = np.asarray(t, dtype=np.float64), np.asarray(d, dtype=np.float64)
    if t.shape != d.shape:
        raise ConfigError(f"{len(t)} trace times but {len(d)} values; they must match")
    if not end > start:
        raise ConfigError(f"the growth window must have end > start, got [{start}, {end}]")
    fin = np.isfinite(d)
    ok = (t >= start) & (t <= end) & fin & (d > 0)
    if ok.sum() < 2 or not fin.any() or t[fin].max() < end:  # too few points, or the trace stops short
        return float("nan")
    x, y = t[ok], np.log(d[ok])
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def growth_rates(traces: Sequence[dict], window: int, field_name: str = "l2") -> dict[int, float]:
    """λ(t0): the growth rate of each perturbed twin over the fixed window [t0, t0 + window]."""
    if int(window) != window or window < 1:
        raise ConfigError(f"the growth window must be a positive number of iterations, got {window}")
    return {t0: growth_rate(t, d, t0, t0 + window) for t0, (t, d) in _perturbed_traces(traces, field_name).items()}


def growth_rate_grid(traces: Sequence[dict], t1s: Sequence[int], field_name: str = "l2"
                     ) -> tuple[list[int], list[int], np.ndarray]:
    """λ over the windows [t0, t1] ending at each t1: (t0 values, t1 values, matrix) with NaN where t1 ≤ t0."""
    curves = _perturbed_traces(traces, field_name)
    t1s = sorted(int(t) for t in t1s)
    m = np.full((len(curves), len(t1s)), np.nan)
    for i, (t0, (t, d)) in enumerate(curves.items()):
        for j, t1 in enumerate(t1s):
            if t1 > t0:
                m[i, j] = growth_rate(t, d, t0, t1)
    return list(curves), t1s, m


def window_values(traces: Sequence[dict], window: int, field_name: str = "l2") -> dict[int, float]:
    """The metric at the fixed window t1 = t0 + window (log-linear between trace points; NaN past the end)."""
    out = {}
    for t0, (t, d) in _perturbed_traces(traces, field_name).items():
        target = t0 + window
        ok = np.isfinite(d) & (d > 0)
        if not ok.any() or t[ok].max() < target or t[ok].min() > target:
            out[t0] = float("nan")
            continue
        out[t0] = float(np.exp(np.interp(target, t[ok], np.log(d[ok]))))
    return out


def growth_transition(t0s, rates, *, stop: float = 0.0) -> int | None:
    """The first t0, from the one with the largest growth rate on, whose λ(t0) ≤ ``stop``.

    Where perturbations stop growing over the window (``stop = 0``: d(t0 + Δ) no larger than
    d(t0) in the least-squares sense). NaN rates are skipped; None when no t0 qualifies
    (perturbations grow at every t0 of the grid) or with fewer than two finite rates.
    """
    t0 = np.asarray(t0s, dtype=np.float64).ravel()
    v = np.asarray(rates, dtype=np.float64).ravel()
    if t0.shape != v.shape:
        raise ConfigError(f"{len(t0)} t0 values but {len(v)} growth rates; they must match")
    ok = np.isfinite(v) & np.isfinite(t0)
    t0, v = t0[ok], v[ok]
    if len(v) < 2:
        return None
    order = np.argsort(t0, kind="stable")
    t0, v = t0[order], v[order]
    start = int(np.argmax(v))
    hit = np.flatnonzero(v[start:] <= stop)
    return int(t0[start + hit[0]]) if len(hit) else None


# --------------------------------------------------------------------------- which basin the twins end in

# chaos_basin: a twin is in the base's basin when its barrier is at most this fraction of the
# barrier between the base and an independent run (two basins by construction).
BASIN_FRAC = 0.1


def basin_values(records: Sequence[dict], field_name: str = "barrier_test", t1: int | None = None
                 ) -> tuple[dict[int, float], float, dict[int, float]]:
    """At ``t1`` (default: the last compared): the twins' ``field_name`` by t0, the independent
    reference's value (NaN without one) and the spawn references' values by t0."""
    t1 = max(r["t1"] for r in records) if t1 is None else t1
    at = [r for r in records if r["t1"] == t1]
    twins = {int(r["t0"]): float(r[field_name]) for r in at if r["member"] == "perturbed"}
    ref = next((float(r[field_name]) for r in at if r["member"] == "independent"), float("nan"))
    spawn = {int(r["t0"]): float(r[field_name]) for r in at if r["member"] == "spawn"}
    return dict(sorted(twins.items())), ref, dict(sorted(spawn.items()))


def basin_transition(t0s, values, reference: float, *, frac: float = BASIN_FRAC) -> int | None:
    """The first t0 from which every twin's barrier (``values``, by ``t0s``) stays at or below
    ``frac`` × ``reference`` (the independent pair's barrier at the same t1).

    None when the reference is not a positive finite barrier (the independent pair is not in two
    basins, so "another basin" has no scale), or when the last t0's twin is still above it (every
    twin of the grid may end in another basin). NaN values are skipped.
    """
    t0 = np.asarray(t0s, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if t0.shape != v.shape:
        raise ConfigError(f"{len(t0)} t0 values but {len(v)} barrier values; they must match")
    if not (np.isfinite(frac) and 0 < frac < 1):
        raise ConfigError(f"frac must be in (0, 1), got {frac}")
    if not (np.isfinite(reference) and reference > 0):
        return None
    ok = np.isfinite(v) & np.isfinite(t0)
    t0, v = t0[ok], v[ok]
    if not len(v):
        return None
    order = np.argsort(t0, kind="stable")
    t0, v = t0[order], v[order]
    inside = v <= frac * reference
    if not inside[-1]:
        return None
    above = np.flatnonzero(~inside)
    return int(t0[above[-1] + 1]) if len(above) else int(t0[0])
