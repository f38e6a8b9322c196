"""The Cone Effect (arXiv 2505.13900, Figs. 4 and 5) from the Gram of checkpoint kernels.

Input: the iterations t_0 < t_1 < … < t_{T−1} of T checkpoints and the T×T Gram
G_ij = ⟨H_i, H_j⟩_F of their empirical NTKs (``/data/kernel_gram`` of an
``entk-kernels`` file). Everything is derived from G alone, in float64: the kernel
directions u_i = H_i/‖H_i‖_F have cosines cos_ij = G_ij / sqrt(G_ii G_jj); the kernel
distance is S_ij = 1 − cos_ij (Fort et al. 2020) and the angle arccos(cos_ij).
Angles below about 1e-8 rad are at the float64 resolution of a cosine.

Half-angle of a set of kernels. The mean direction of {u_i} is m = Σ_i u_i; its
cosine with each member needs only the Gram: cos(u_i, m) = Σ_j cos_ij / sqrt(Σ_jk cos_jk).
The half-angle is the largest angle between a member and m, i.e. the half-opening of
the narrowest cone around the mean direction that contains every member (the scale of
each kernel plays no part). It is 0 for kernels that all point the same way.

Transition rule (the Cone Effect, analyze_cone). For each checkpoint i, the *suffix
half-angle* a_i is the half-angle of {H_j : j ≥ i}, the kernels from i to the end of
training. a_0 is the half-angle of the whole trajectory; a_{T−1} = 0. The trajectory
*enters the cone* at the first checkpoint i with a_i ≤ rho · a_0 (default rho = 0.5):
from there on, every kernel fits in a cone at most rho times as wide as the cone of
the whole trajectory. That checkpoint is the transition; a_i there is the cone
half-angle. A trajectory that keeps rotating freely also produces a transition by
this rule (its suffix half-angle shrinks only because fewer kernels remain), but then
the cone half-angle stays close to rho · a_0 and the suffix curve falls steadily
instead of dropping and then staying flat, which is what plot_cone shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = [
    "ConeAnalysis",
    "analyze_cone",
    "classical_mds",
    "cosine_matrix",
    "half_angle",
    "load_cone",
    "reference_curves",
    "suffix_half_angles",
    "velocity_curves",
]

_EPS = np.finfo(np.float64).eps


@dataclass
class ConeAnalysis:
    """Geometry of a trajectory of kernels, all in float64 (angles in radians)."""

    iterations: np.ndarray         # (T,) int64, increasing
    gram: np.ndarray               # (T, T) ⟨H_i, H_j⟩_F
    distance: np.ndarray           # (T, T) S = 1 − cos, zero diagonal
    angle: np.ndarray              # (T, T) arccos(clip(cos, −1, 1))
    norms: np.ndarray              # (T,) ‖H_i‖_F
    polar_angle: np.ndarray        # (T,) angle(H_t, H_0)
    polar_radius: np.ndarray       # (T,) ‖H_t‖ / ‖H_0‖
    mds: np.ndarray                # (T, 2) classical MDS of the angle matrix
    suffix_half_angle: np.ndarray  # (T,) half-angle of {H_j : j ≥ i}
    transition_index: int
    transition_iteration: int
    cone_half_angle: float         # suffix_half_angle[transition_index]
    rule: str                      # the transition rule, one sentence
    rho: float = 0.5               # the rule's parameter

    @property
    def post_transition(self) -> np.ndarray:
        """Boolean mask of the checkpoints from the transition on."""
        return np.arange(len(self.iterations)) >= self.transition_index


def _check_gram(gram, what: str = "gram") -> np.ndarray:
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ConfigError(f"{what} must be a square (T, T) matrix, got shape {g.shape}")
    if g.shape[0] < 1:
        raise ConfigError(f"{what} is empty")
    if not np.isfinite(g).all():
        i, j = np.argwhere(~np.isfinite(g))[0]
        raise ConfigError(f"{what} has a non-finite entry at ({i}, {j}): {g[i, j]}")
    d = np.diag(g)
    if (d <= 0).any():
        i = int(np.flatnonzero(d <= 0)[0])
        raise ConfigError(f"kernel {i} is zero ({what}[{i}, {i}] = ⟨H_{i}, H_{i}⟩ = {d[i]:.3g}, must be > 0)")
    scale = np.sqrt(np.outer(d, d))
    asym = np.abs(g - g.T) / scale
    tol = 1e3 * _EPS * g.shape[0]
    if asym.max() > tol:
        i, j = np.unravel_index(np.argmax(asym), asym.shape)
        raise ConfigError(f"{what} is not symmetric: entries ({i}, {j}) and ({j}, {i}) differ by "
                          f"{asym[i, j]:.3g} relative to sqrt(G_ii G_jj)")
    return (g + g.T) / 2


def cosine_matrix(gram) -> np.ndarray:
    """cos_ij = G_ij / sqrt(G_ii G_jj), clipped to [−1, 1], exactly 1 on the diagonal."""
    g = _check_gram(gram)
    n = np.sqrt(np.diag(g))
    c = np.clip(g / n[:, None] / n[None, :], -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return c


def _half_angle_from_cos(c: np.ndarray) -> float:
    total = c.sum()
    if total <= 0:   # the unit directions cancel: no mean direction, nothing narrower than a half-space
        return float(np.pi)
    cos_m = c.sum(axis=1) / np.sqrt(total)
    return float(np.arccos(np.clip(cos_m, -1.0, 1.0)).max())


def half_angle(gram) -> float:
    """Largest angle (radians) between a kernel and the mean unit direction m = Σ u_i.

    cos(u_i, m) = Σ_j cos_ij / sqrt(Σ_jk cos_jk), so only the Gram is needed. π when the
    directions cancel (m = 0).
    """
    return _half_angle_from_cos(cosine_matrix(gram))


def suffix_half_angles(gram) -> np.ndarray:
    """(T,): element i is the half-angle of the kernels i, i+1, …, T−1 (O(T²))."""
    c = cosine_matrix(gram)
    t = c.shape[0]
    # r[j, i] = Σ_{k ≥ i} cos_jk (reverse cumulative sums along each row)
    r = np.cumsum(c[:, ::-1], axis=1)[:, ::-1]
    out = np.empty(t)
    for i in range(t):
        rows = r[i:, i]
        total = rows.sum()
        if total <= 0:
            out[i] = np.pi
        else:
            out[i] = np.arccos(np.clip(rows / np.sqrt(total), -1.0, 1.0)).max()
    return out


def classical_mds(dist, dim: int = 2) -> np.ndarray:
    """Classical (Torgerson) MDS: (T, dim) points whose distances approximate ``dist``.

    B = −½ J D² J with J the centring matrix; coordinates are the top ``dim``
    eigenvectors of B times the square roots of their eigenvalues (negative ones,
    from a non-Euclidean ``dist``, clipped to 0). Exact for Euclidean distances of
    points in ``dim`` dimensions, up to rotation and reflection. Each axis is signed so
    that its largest-magnitude coordinate is positive (deterministic output).
    """
    d = np.asarray(dist, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 1:
        raise ConfigError(f"distance matrix must be square (T, T), got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ConfigError("distance matrix has non-finite entries")
    if int(dim) != dim or dim < 1:
        raise ConfigError(f"MDS dimension must be a positive integer, got {dim}")
    t = d.shape[0]
    d2 = ((d + d.T) / 2) ** 2
    j = np.eye(t) - 1.0 / t
    b = -0.5 * j @ d2 @ j
    w, v = np.linalg.eigh((b + b.T) / 2)
    order = np.argsort(w)[::-1][:dim]
    x = v[:, order] * np.sqrt(np.clip(w[order], 0.0, None))
    for k in range(x.shape[1]):
        col = x[:, k]
        if col[np.argmax(np.abs(col))] < 0:
            x[:, k] = -col
    if x.shape[1] < dim:
        x = np.hstack([x, np.zeros((t, dim - x.shape[1]))])
    return x


def _check_iterations(iterations, t: int) -> np.ndarray:
    it = np.asarray(iterations)
    if it.ndim != 1:
        raise ConfigError(f"iterations must be a 1-D sequence, got shape {it.shape}")
    if len(it) != t:
        raise ConfigError(f"{len(it)} iterations for a {t}x{t} Gram; they must match")
    if not np.isfinite(it.astype(np.float64)).all() or (it.astype(np.float64) != np.round(it.astype(np.float64))).any():
        raise ConfigError(f"iterations must be finite integers, got {it.tolist()}")
    it = it.astype(np.int64)
    bad = np.flatnonzero(np.diff(it) <= 0)
    if len(bad):
        k = int(bad[0])
        raise ConfigError(f"iterations must be strictly increasing, got {int(it[k])} then {int(it[k + 1])} "
                          f"at positions {k}, {k + 1}")
    return it


def analyze_cone(iterations, gram, *, rho: float = 0.5) -> ConeAnalysis:
    """Distances, angles, polar and MDS views and the cone transition (module docstring)."""
    g = _check_gram(gram)
    t = g.shape[0]
    if t < 2:
        raise ConfigError(f"the cone analysis needs at least 2 checkpoints, got {t}")
    it = _check_iterations(iterations, t)
    if not (np.isfinite(rho) and 0 < rho <= 1):
        raise ConfigError(f"rho must be in (0, 1], got {rho}")
    c = cosine_matrix(g)
    norms = np.sqrt(np.diag(g))
    distance = 1.0 - c
    np.fill_diagonal(distance, 0.0)
    angle = np.arccos(c)
    np.fill_diagonal(angle, 0.0)
    suffix = suffix_half_angles(g)
    idx = int(np.flatnonzero(suffix <= rho * suffix[0])[0])
    rule = (f"the transition is the first checkpoint from which all later kernels lie within a cone "
            f"(around their mean direction) whose half-angle is at most rho = {rho:g} times the half-angle "
            f"of the whole trajectory")
    return ConeAnalysis(
        iterations=it, gram=g, distance=distance, angle=angle, norms=norms,
        polar_angle=angle[:, 0].copy(), polar_radius=norms / norms[0],
        mds=classical_mds(angle, 2), suffix_half_angle=suffix,
        transition_index=idx, transition_iteration=int(it[idx]),
        cone_half_angle=float(suffix[idx]), rule=rule, rho=float(rho))


def reference_curves(a: ConeAnalysis, taus: Iterable[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Fig. 5(a): for each reference iteration τ (a checkpoint), (t, S(θ_τ, θ_t)) for t ≥ τ."""
    its = [int(i) for i in a.iterations]
    out = {}
    for tau in taus:
        if int(tau) != tau or int(tau) not in its:
            raise ConfigError(f"reference iteration {tau} is not a checkpoint (available: {its})")
        i = its.index(int(tau))
        out[int(tau)] = (a.iterations[i:].copy(), a.distance[i, i:].copy())
    return out


def velocity_curves(a: ConeAnalysis, lags: Sequence[int] = (1, 2, 4)
                    ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fig. 5(b): for lag k (checkpoint steps), (t_i, S(t_i, t_{i+k}), S / (t_{i+k} − t_i)).

    A lag of at least T gives empty arrays.
    """
    t = len(a.iterations)
    out = {}
    for k in lags:
        if int(k) != k or k < 1:
            raise ConfigError(f"lags must be positive integers (checkpoint steps), got {k}")
        k = int(k)
        i = np.arange(max(t - k, 0))
        s = a.distance[i, i + k]
        dt = (a.iterations[i + k] - a.iterations[i]).astype(np.float64)
        out[k] = (a.iterations[i].copy(), s, s / dt)
    return out


def load_cone(kernels_path, *, rho: float = 0.5) -> ConeAnalysis:
    """:func:`analyze_cone` of a kernel store (``entk ntk --out``) from its stored Gram of kernels.

    Raises a one-line :class:`~engine.store.StoreError` when the pairwise unit is not
    complete yet, saying how many kernels are and how to finish.
    """
    from ..store import KernelStore, StoreError

    store = KernelStore(kernels_path)
    pair = store.distances()
    if pair is None:
        done = len(store.completed_iterations())
        raise StoreError(f"{kernels_path}: the pairwise kernel distances are not computed yet ({done} of "
                         f"{len(store.iterations)} kernels complete); rerun the same `entk ntk` command to finish")
    return analyze_cone(store.iterations, pair[0], rho=rho)
