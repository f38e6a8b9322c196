"""Chaos Effect analysis (arXiv 2505.13900, Fig. 3) of the chaos grid's records
(:mod:`engine.jobs.chaos` writes them): the (t0, t1) grids of a metric and the chaos transition.

Transition rule (the Chaos Effect, chaos_transition). Given one chaos metric per
perturbation time t0 (e.g. the twins' parameter dissimilarity at the last compared
iteration t1), the early level is the largest value and the late level the value at
the last t0. The chaos transition is the first t0, from the one with the largest value
on, whose value is at or below the geometric interpolation, a fraction frac (default
0.5) of the way from the early to the late level in log space:
value ≤ exp((1 − frac)·log(early) + frac·log(late)). Only finite positive values count;
with fewer than two of them, or no decrease from the early to the late level, there is
no transition (None).
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
