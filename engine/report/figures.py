"""The paper's figures from stored results: Fig. 3 (Chaos Effect), Fig. 4 (kernel distance), Fig. 5 (Cone Effect),
and the study's controls: Fig. 6 (growth of the divergence, growth rates), Fig. 7 (kernel-trajectory diagnostics).

Every time axis draws the learning-rate changes (``lr_changes``, grey dash-dot lines) so that an
effect that coincides with a change of the schedule is visible as such.

Every function draws on a fresh ``matplotlib.figure.Figure`` rendered by the Agg canvas
(no pyplot state, no display needed, safe to call from any backend), writes
``<out_stem>.png`` (130 dpi) and ``<out_stem>.pdf``, and returns the written paths.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, SymLogNorm
from matplotlib.figure import Figure

from ..analysis.chaos import chaos_grid, growth_curves, growth_rates, window_values
from ..analysis.cone import ConeAnalysis, reference_curves, velocity_curves
from ..errors import ConfigError

DPI = 130
_TRANSITION = {"color": "black", "ls": "--", "lw": 1.2}
_CHAOS = {"color": "tab:red", "ls": ":", "lw": 1.6}
_LR = {"color": "0.35", "ls": "-.", "lw": 1.1}


def _lr_lines(ax, changes, *, axis: str = "x", pos=None) -> None:
    """Draw the learning-rate changes on a time axis (``pos`` maps an iteration to axis units)."""
    changes = list(changes or [])
    for n, c in enumerate(changes):
        x = c if pos is None else pos(c)
        if x is None:
            continue
        label = "lr change" if n == 0 else None
        (ax.axvline if axis == "x" else ax.axhline)(x, **_LR, label=label)


def _index_pos(ts):
    """Iteration → fractional cell index on a heatmap whose cells are the iterations ``ts``."""
    ts = np.asarray(ts, dtype=np.float64)

    def pos(c):
        if len(ts) < 2 or not ts[0] <= c <= ts[-1]:
            return None
        return float(np.interp(c, ts, np.arange(len(ts))))
    return pos


def _summaries(summary) -> list[dict]:
    return [summary] if isinstance(summary, dict) else list(summary)


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_stem) -> list[Path]:
    """``fig`` as ``out_stem``.png and .pdf (the folder made); the paths written."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = stem.parent / f"{stem.name}.{ext}"
        fig.savefig(p, dpi=DPI)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- Fig. 3


def plot_chaos(summary, out_stem, barrier: str = "test", *, lr_changes=()) -> list[Path]:
    """Fig. 3: heatmaps over (t0, t1) of dissimilarity (log colour), loss barrier and disagreement.

    ``summary`` is ``ChaosResult.summary()`` (or the ``--json`` summary of ``entk chaos``), or a
    list of them (one per seed of one grid): each cell is then the mean over the seeds.
    """
    if barrier not in ("test", "train"):
        raise ConfigError(f"barrier must be 'test' or 'train', got {barrier!r}")
    sums = _summaries(summary)
    summary = sums[0]
    recs = summary["records"]
    if not recs or not all(s["records"] for s in sums):
        raise ConfigError("the chaos summary has no completed (t0, t1) pairs yet")
    panels = [("dissimilarity", r"parameter dissimilarity $1-\cos(\theta,\theta')$", True),
              (f"barrier_{barrier}", f"loss barrier ({barrier})", False),
              ("disagreement", "prediction disagreement (test)", False)]
    cfg = summary["config"]
    fig = _new_figure((15, 4.6))
    axes = fig.subplots(1, 3)
    for ax, (field, title, log) in zip(axes, panels, strict=True):
        t0s, t1s, m = chaos_grid(recs, field)
        if len(sums) > 1:
            grids = [chaos_grid(s["records"], field)[2] for s in sums]
            if any(g.shape != m.shape for g in grids):
                raise ConfigError("the chaos summaries of the seeds have different grids")
            m = np.mean(grids, axis=0)
        vals = m[np.isfinite(m)]
        norm = None
        if log and len(vals) and (vals > 0).any():
            pos = vals[vals > 0]
            norm = LogNorm(vmin=max(pos.min(), 1e-12), vmax=pos.max())
            m = np.where(m > 0, m, np.nan) if norm else m
        im = ax.imshow(m, origin="lower", aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(t1s)), [str(t) for t in t1s], rotation=45)
        ax.set_yticks(range(len(t0s)), [str(t) for t in t0s])
        ax.set_xlabel("$t_1$ (iteration compared)")
        ax.set_ylabel("$t_0$ (iteration perturbed)")
        ax.set_title(title)
        _lr_lines(ax, lr_changes, pos=_index_pos(t1s))
        _lr_lines(ax, lr_changes, axis="y", pos=_index_pos(t0s))
        fig.colorbar(im, ax=ax)
    floor = max(s.get("noise_floor") for s in sums)
    tc = cfg["train"]
    seeds = f", mean of {len(sums)} seeds" if len(sums) > 1 else ""
    fig.suptitle(f"Chaos Effect: {tc['model']} on {tc['data']}, eps={cfg['eps']} ({cfg['norm']}){seeds}; "
                 f"noise floor (control vs base, L2) = {floor:.3g}"
                 + (f"; lr changes at {list(lr_changes)}" if lr_changes else "; constant learning rate"))
    return save_figure(fig, out_stem)


# --------------------------------------------------------------------------- Fig. 4


def _log_edges(iterations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres log(1+t) and the edges half-way between them (extended at both ends)."""
    c = np.log1p(np.asarray(iterations, dtype=np.float64))
    if len(c) == 1:
        return c, np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return c, np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _tick_subset(n: int, most: int = 12) -> np.ndarray:
    if n <= most:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, most)).astype(int))


def _deg(x: float) -> str:
    return f"{np.degrees(x):.3g}°"


def plot_kernel_distance(a: ConeAnalysis, out_stem, *, title: str | None = None, lr_changes=()) -> list[Path]:
    """Fig. 4: the T×T kernel distance S(H_i, H_j) on a log(1+t) grid, transition marked."""
    centres, edges = _log_edges(a.iterations)
    fig = _new_figure((7.2, 6.0))
    ax = fig.subplots()
    im = ax.pcolormesh(edges, edges, a.distance, cmap="viridis", vmin=0, shading="flat")
    ticks = _tick_subset(len(centres))
    labels = [str(int(t)) for t in a.iterations[ticks]]
    ax.set_xticks(centres[ticks], labels, rotation=45)
    ax.set_yticks(centres[ticks], labels)
    ax.set_xlabel("iteration $t_j$ (log scale)")
    ax.set_ylabel("iteration $t_i$ (log scale)")
    ax.set_aspect("equal")
    edge = edges[a.transition_index]   # the transition cell's lower edge: the cone is up and right of it
    ax.axvline(edge, color="tab:red", ls="--", lw=1.6, label=f"transition t = {a.transition_iteration}")
    ax.axhline(edge, color="tab:red", ls="--", lw=1.6)
    inside = [c for c in lr_changes if a.iterations[0] <= c <= a.iterations[-1]]
    _lr_lines(ax, inside, pos=lambda c: float(np.log1p(c)))
    _lr_lines(ax, inside, axis="y", pos=lambda c: float(np.log1p(c)))
    ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    fig.colorbar(im, ax=ax, label=r"$S = 1 - \langle H_i, H_j\rangle_F / (\|H_i\|\,\|H_j\|)$", shrink=0.85)
    post = a.distance[np.ix_(a.post_transition, a.post_transition)]
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}kernel distance between checkpoints\n"
                 f"transition at t = {a.transition_iteration}; max S after it = {post.max():.3g} "
                 f"(whole run {a.distance.max():.3g}); cone half-angle {_deg(a.cone_half_angle)}", fontsize=10)
    return save_figure(fig, out_stem)


# --------------------------------------------------------------------------- Fig. 5


def default_taus(iterations, n: int = 4) -> list[int]:
    """About ``n`` checkpoints (never the last) spread evenly in log(1+t)."""
    it = np.asarray(iterations)
    cand = it[:-1] if len(it) > 1 else it
    c = np.log1p(cand.astype(np.float64))
    picks = {int(np.argmin(np.abs(c - x))) for x in np.linspace(c[0], c[-1], n)}
    return [int(cand[i]) for i in sorted(picks)]


def _mark(ax, a: ConeAnalysis, chaos_t0: int | None, lr_changes=()) -> None:
    ax.axvline(a.transition_iteration, **_TRANSITION, label=f"cone transition t = {a.transition_iteration}")
    if chaos_t0 is not None:
        ax.axvline(chaos_t0, **_CHAOS, label=f"chaos transition $t_0$ = {chaos_t0}")
    _lr_lines(ax, [c for c in lr_changes if c <= a.iterations[-1]])


def _iteration_axis(ax, a: ConeAnalysis, chaos_t0: int | None) -> None:
    ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    last = max(float(a.iterations[-1]), float(chaos_t0) if chaos_t0 is not None else 0.0)
    first = min(float(a.iterations[0]), float(chaos_t0) if chaos_t0 is not None else np.inf)
    ax.set_xlim(first - 0.1 if first <= 1 else first / 1.2, last * 1.3)
    ax.set_xlabel("iteration t")
    ax.grid(True, which="major", alpha=0.3)


def _iteration_norm(a: ConeAnalysis) -> SymLogNorm:
    return SymLogNorm(linthresh=1, linscale=0.5, vmin=float(a.iterations[0]), vmax=float(a.iterations[-1]))


def plot_cone(a: ConeAnalysis, out_stem, *, taus: Sequence[int] | None = None, lags: Sequence[int] = (1, 2, 4),
              chaos_t0: int | None = None, title: str | None = None, lr_changes=()) -> list[Path]:
    """Fig. 5: the Cone Effect in six panels.

    (a) S(θ_τ, θ_t) vs t for reference checkpoints τ; (b) S(θ_t, θ_{t+k}) for lags of k
    checkpoints and (b′) the same per iteration, S/Δt; (c) polar view: angle to H_0 and
    ‖H_t‖/‖H_0‖, with the cone (mean post-transition angle ± cone half-angle); (d) classical
    MDS of the angle matrix; (e) the suffix half-angle that defines the transition.
    The cone transition is a dashed line, the chaos transition (``chaos_t0``) a dotted one.
    """
    taus = default_taus(a.iterations) if taus is None else list(taus)
    refs = reference_curves(a, taus)
    vel = velocity_curves(a, lags)
    fig = _new_figure((17, 9.5))
    cmap = "viridis"

    # (a) distance from reference checkpoints
    ax = fig.add_subplot(2, 3, 1)
    colors = [f"C{k}" for k in range(len(refs))]
    for (tau, (t, s)), col in zip(refs.items(), colors, strict=True):
        ax.plot(t, s, "o-", ms=3.5, color=col, label=rf"$\tau$ = {tau}")
    _mark(ax, a, chaos_t0, lr_changes)
    _iteration_axis(ax, a, chaos_t0)
    ax.set_ylabel(r"$S(\theta_\tau, \theta_t)$")
    ax.set_title(r"(a) kernel distance from reference checkpoint $\tau$")
    ax.legend(fontsize=8)

    # (b) distance between checkpoints k apart, and (b') per iteration
    ax_s = fig.add_subplot(2, 3, 2)
    ax_r = fig.add_subplot(2, 3, 3)
    for k, (t, s, rate) in vel.items():
        if len(t) == 0:
            continue
        pos = s > 0
        ax_s.plot(t[pos], s[pos], "o-", ms=3.5, label=f"lag {k} checkpoint{'s' if k > 1 else ''}")
        ax_r.plot(t[pos], rate[pos], "o-", ms=3.5, label=f"lag {k}")
    for ax, ylab, ttl in ((ax_s, r"$S(\theta_{t_i}, \theta_{t_{i+k}})$", "(b) kernel distance between checkpoints"),
                          (ax_r, r"$S(\theta_{t_i}, \theta_{t_{i+k}})\,/\,(t_{i+k} - t_i)$",
                           "(b') kernel distance per iteration")):
        _mark(ax, a, chaos_t0, lr_changes)
        _iteration_axis(ax, a, chaos_t0)
        ax.set_yscale("log")
        ax.set_xlabel("iteration $t_i$")
        ax.set_ylabel(ylab)
        ax.set_title(ttl)
        ax.legend(fontsize=8)

    # (c) polar view
    ax = fig.add_subplot(2, 3, 4, projection="polar")
    post = a.post_transition
    theta, r = a.polar_angle, a.polar_radius
    mean_post = float(theta[post].mean())
    rmax = float(r.max()) * 1.08
    ax.plot(theta, r, color="0.6", lw=0.8, zorder=1)
    sc = ax.scatter(theta, r, c=a.iterations, cmap=cmap, norm=_iteration_norm(a), s=22, zorder=2)
    ax.scatter([theta[0]], [r[0]], color="black", s=40, zorder=3, label="$H_0$")
    for sgn in (-1, 1):
        ang = mean_post + sgn * a.cone_half_angle
        ax.plot([ang, ang], [0, rmax], color="tab:orange", lw=1.5,
                label=f"cone: {_deg(mean_post)} ± {_deg(a.cone_half_angle)}" if sgn < 0 else None)
    top = min(np.degrees(max(theta.max(), mean_post + a.cone_half_angle)) * 1.15 + 2, 180.0)
    ax.set_thetamin(0)
    ax.set_thetamax(top)
    ax.set_rmax(rmax)
    ax.set_rorigin(0)
    ax.set_title(r"(c) polar view: angle$(H_t, H_0)$, radius $\|H_t\|/\|H_0\|$", fontsize=10)
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.05, 1.0))
    fig.colorbar(sc, ax=ax, label="iteration", shrink=0.8)

    # (d) MDS of the angle matrix
    ax = fig.add_subplot(2, 3, 5)
    x = a.mds
    ax.plot(x[:, 0], x[:, 1], color="0.6", lw=0.8, zorder=1)
    sc = ax.scatter(x[:, 0], x[:, 1], c=a.iterations, cmap=cmap, norm=_iteration_norm(a), s=26, zorder=2)
    ax.scatter(x[:1, 0], x[:1, 1], color="black", s=45, zorder=3, label="$H_0$")
    i = a.transition_index
    ax.scatter(x[i:i + 1, 0], x[i:i + 1, 1], facecolors="none", edgecolors="black", s=120, lw=1.4, zorder=3,
               label=f"transition t = {a.transition_iteration}")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("MDS 1 (rad)")
    ax.set_ylabel("MDS 2 (rad)")
    ax.set_title("(d) classical MDS of the angles between kernels")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.colorbar(sc, ax=ax, label="iteration", shrink=0.8)

    # (e) the transition rule
    ax = fig.add_subplot(2, 3, 6)
    ax.plot(a.iterations, np.degrees(a.suffix_half_angle), "o-", ms=3.5, color="C0",
            label=r"half-angle of $\{H_j : t_j \geq t\}$")
    ax.axhline(np.degrees(a.rho * a.suffix_half_angle[0]), color="0.4", lw=1,
               label=f"rho × whole-run half-angle (rho = {a.rho:g})")
    _mark(ax, a, chaos_t0, lr_changes)
    _iteration_axis(ax, a, chaos_t0)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("suffix half-angle (degrees)")
    ax.set_title("(e) cone of the kernels from t on (transition rule)")
    ax.legend(fontsize=8)

    head = f"{title}: " if title else ""
    fig.suptitle(f"{head}Cone Effect over {len(a.iterations)} checkpoints: transition at t = "
                 f"{a.transition_iteration}, cone half-angle {_deg(a.cone_half_angle)} "
                 f"(whole trajectory {_deg(a.suffix_half_angle[0])})")
    return save_figure(fig, out_stem)


# --------------------------------------------------------------------------- Fig. 6


def _band(ax, x, ys, color, label, *, geometric: bool = False, marker: str = "o-"):
    """Mean over seeds (geometric for log quantities) with a min–max band; ``ys`` is (seeds, len(x))."""
    ys = np.asarray(ys, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # columns that are NaN for every seed stay NaN
        mid = np.exp(np.nanmean(np.log(ys), axis=0)) if geometric else np.nanmean(ys, axis=0)
        lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
    ax.plot(x, mid, marker, ms=3, color=color, label=label)
    if len(ys) > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def _mark_transitions(ax, transitions, rules) -> None:
    styles = {"sensitivity_growth": {"color": "tab:red", "ls": ":"},
              "sensitivity_window": {"color": "tab:purple", "ls": ":"},
              "sensitivity_dissimilarity": {"color": "tab:brown", "ls": ":"}, "cone": {"color": "black", "ls": "--"}}
    for t in transitions or []:
        if t["rule"] in rules and t["iteration"] is not None:
            spread = f" ± {t['spread']:.0f}" if t.get("spread") is not None else ""
            ax.axvline(t["iteration"], lw=1.5, **styles.get(t["rule"], {}),
                       label=f"{t['rule']}: {t['iteration']:.0f}{spread}")
            if t.get("spread"):
                ax.axvspan(t["iteration"] - t["spread"], t["iteration"] + t["spread"],
                           color=styles.get(t["rule"], {}).get("color", "0.5"), alpha=0.08)


def plot_growth(summaries, out_stem, *, window: int, lr_changes=(), transitions=None) -> list[Path]:
    """Fig. 6: (a) growth curves d(t0, t) (L2 twin-base distance) per t0; (b) growth rate λ(t0) over
    [t0, t0 + window]; (c) dissimilarity at the fixed window t0 + window and at the last t1, per t0.
    With several seeds: geometric (a) or arithmetic (b) mean and a min–max band."""
    sums = _summaries(summaries)
    traces = [s.get("trace") or [] for s in sums]
    if not all(traces):
        raise ConfigError("the chaos summaries have no divergence traces (run the chaos job with trace_every > 0)")
    curves = [growth_curves(tr) for tr in traces]
    t0s = sorted(curves[0])
    fig = _new_figure((17, 5.2))
    ax_a, ax_b, ax_c = fig.subplots(1, 3)
    cmap = __import__("matplotlib").colormaps["viridis"]
    for n, t0 in enumerate(t0s):
        t = curves[0][t0][0]
        ys = [c[t0][1] for c in curves if t0 in c and len(c[t0][1]) == len(t)]
        _band(ax_a, t, ys, cmap(n / max(len(t0s) - 1, 1)), f"$t_0$ = {t0}", geometric=True, marker="-")
    ax_a.set_yscale("log")
    ax_a.set_xscale("symlog", linthresh=10, linscale=0.5)
    ax_a.set_xlabel("iteration t")
    ax_a.set_ylabel(r"$d(t_0, t) = \|\theta'_t - \theta_t\|_2$")
    ax_a.set_title("(a) growth of the twin-base distance")
    _lr_lines(ax_a, lr_changes)
    ax_a.legend(fontsize=7, ncol=2)

    rates = [growth_rates(tr, window) for tr in traces]
    x = np.array(t0s, dtype=np.float64)
    _band(ax_b, x, [[r.get(t, np.nan) for t in t0s] for r in rates], "C0",
          rf"$\lambda(t_0)$ over $[t_0, t_0 + {window}]$")
    ax_b.axhline(0, color="0.5", lw=1)
    _mark_transitions(ax_b, transitions, {"sensitivity_growth"})
    _lr_lines(ax_b, lr_changes)
    ax_b.set_xscale("symlog", linthresh=10, linscale=0.5)
    ax_b.set_xlabel("$t_0$ (iteration perturbed)")
    ax_b.set_ylabel(r"growth rate $\lambda$ (per iteration)")
    ax_b.set_title("(b) finite-time growth rate of log d")
    ax_b.legend(fontsize=7)

    wins = [window_values(tr, window, "dissimilarity") for tr in traces]
    _band(ax_c, x, [[w.get(t, np.nan) for t in t0s] for w in wins], "C1",
          f"at $t_1 = t_0 + {window}$", geometric=True)
    last = max(r["t1"] for r in sums[0]["records"])
    ends = []
    for s in sums:
        per = {r["t0"]: r["dissimilarity"] for r in s["records"] if r["member"] == "perturbed" and r["t1"] == last}
        ends.append([per.get(t, np.nan) for t in t0s])
    _band(ax_c, x, ends, "C2", f"at the last $t_1$ = {last}", geometric=True)
    _mark_transitions(ax_c, transitions, {"sensitivity_window", "sensitivity_dissimilarity"})
    _lr_lines(ax_c, lr_changes)
    ax_c.set_yscale("log")
    ax_c.set_xscale("symlog", linthresh=10, linscale=0.5)
    ax_c.set_xlabel("$t_0$ (iteration perturbed)")
    ax_c.set_ylabel(r"dissimilarity $1 - \cos(\theta, \theta')$")
    ax_c.set_title("(c) fixed window vs fixed end")
    ax_c.legend(fontsize=7)
    seeds = f"{len(sums)} seeds (mean, min-max band)" if len(sums) > 1 else "1 seed"
    fig.suptitle(f"Divergence of perturbed twins: {seeds}; "
                 + (f"lr changes at {list(lr_changes)}" if lr_changes else "constant learning rate"))
    return save_figure(fig, out_stem)


# --------------------------------------------------------------------------- Fig. 7


def plot_kernel_diagnostics(diags, out_stem, *, lr_changes=(), cone_transition=None) -> list[Path]:
    """Fig. 7: per checkpoint, (a) kernel–label alignment (CKA), (b) the top eigenvalues of the eNTK,
    (c) its effective rank, (d) its distance S to the final kernel; mean and min–max band over seeds."""
    diags = list(diags)
    t = np.asarray(diags[0].iterations, dtype=np.float64)
    if any(len(d.iterations) != len(t) for d in diags):
        raise ConfigError("the seeds' kernel trajectories have different checkpoints")
    fig = _new_figure((17, 4.6))
    axes = fig.subplots(1, 4)
    _band(axes[0], t, [d.alignment for d in diags], "C0", "CKA(traced H, $YY^T$)")
    axes[0].set_title("(a) kernel-label alignment")
    top = np.stack([d.top_eigenvalues for d in diags])  # (seeds, T, k)
    for j in range(top.shape[2]):
        _band(axes[1], t, top[:, :, j], f"C{j}", rf"$\lambda_{j + 1}$", geometric=True, marker="-")
    axes[1].set_yscale("log")
    axes[1].set_title("(b) top eigenvalues of H")
    _band(axes[2], t, [d.effective_rank for d in diags], "C2", "effective rank")
    axes[2].set_title("(c) effective rank of H")
    dist = [np.where(np.asarray(d.distance_to_final) > 0, d.distance_to_final, np.nan) for d in diags]
    _band(axes[3], t, dist, "C3", r"$S(H_t, H_{final})$", geometric=True)
    axes[3].set_yscale("log")
    axes[3].set_title("(d) distance to the final kernel")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1, linscale=0.5)
        ax.set_xlabel("iteration t")
        _lr_lines(ax, [c for c in lr_changes if c <= t[-1]])
        if cone_transition is not None:
            ax.axvline(cone_transition, **_TRANSITION, label=f"cone transition {cone_transition:.0f}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    seeds = f"{len(diags)} seeds (mean, min-max band)" if len(diags) > 1 else "1 seed"
    fig.suptitle(f"Kernel trajectory diagnostics: {seeds}")
    return save_figure(fig, out_stem)
