"""Fig. 3b: which basin the twins end in. The test loss barrier (top) and error barrier (bottom)
between the base and its twin against t0, one column per t1, with the reference pairs as
horizontal bands: the independent pair (another initialisation) and the spawn pairs (the base at
t0 on another data order, drawn at their t0). The dashed line is the chaos_basin threshold.
Drawn like :mod:`engine.report.figures` (Agg canvas, PNG at 130 dpi and PDF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..analysis.chaos import BASIN_FRAC, basin_values
from ..errors import ConfigError
from .figures import save_figure

DPI = 130
_FIELDS = (("barrier_test", "test loss barrier"), ("error_barrier_test", "test error barrier"))


def _stack(rows: list[dict], keys: list[int]) -> np.ndarray:
    return np.array([[r.get(k, np.nan) for k in keys] for r in rows], dtype=np.float64)


def plot_basins(summaries, out_stem, *, lr_changes=()) -> list[Path]:
    """Barrier vs t0 at each t1 (mean over seeds, min–max band), reference pairs as bands."""
    sums = [summaries] if isinstance(summaries, dict) else list(summaries)
    recs = [s["records"] for s in sums]
    if not all(recs):
        raise ConfigError("the chaos summaries have no completed (t0, t1) pairs yet")
    t1s = sorted({r["t1"] for r in recs[0]})
    fig = Figure(figsize=(4.6 * len(t1s), 7.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(2, len(t1s), squeeze=False))
    for row, (field, label) in enumerate(_FIELDS):
        if not all(field in r for rs in recs for r in rs):
            continue  # files written before the error barrier was recorded
        for col, t1 in enumerate(t1s):
            ax = axes[row, col]
            vals = [basin_values(rs, field, t1) for rs in recs]
            t0s = sorted(set().union(*(v[0] for v in vals)))
            twins = _stack([v[0] for v in vals], t0s)
            x = np.asarray(t0s, dtype=np.float64)
            ax.plot(x, np.nanmean(twins, axis=0), "o-", ms=4, color="tab:blue", label="twin (1e-7 perturbation)")
            if len(sums) > 1:
                ax.fill_between(x, np.nanmin(twins, axis=0), np.nanmax(twins, axis=0), color="tab:blue",
                                alpha=0.2, lw=0)
            ref = np.array([v[1] for v in vals], dtype=np.float64)
            if np.isfinite(ref).any():
                m = float(np.nanmean(ref))
                ax.axhspan(np.nanmin(ref), np.nanmax(ref), color="tab:orange", alpha=0.25, lw=0)
                ax.axhline(m, color="tab:orange", lw=1.6, label="independent pair (another init)")
                if field == "barrier_test":
                    ax.axhline(BASIN_FRAC * m, color="tab:orange", lw=1, ls="--",
                               label=f"{BASIN_FRAC:g} x independent (chaos_basin)")
            spawn_t0 = sorted(set().union(*(v[2] for v in vals)))
            if spawn_t0:
                sp = _stack([v[2] for v in vals], spawn_t0)
                mid = np.nanmean(sp, axis=0)
                ax.errorbar(spawn_t0, mid, yerr=[mid - np.nanmin(sp, axis=0), np.nanmax(sp, axis=0) - mid],
                            fmt="s", ms=6, color="tab:green", capsize=3, label="spawn (other data order)")
                for v in mid:
                    ax.axhline(v, color="tab:green", lw=0.6, ls=":", alpha=0.7)
            for c in lr_changes:
                if c <= t1:
                    ax.axvline(c, color="0.35", ls="-.", lw=1.1)
            ax.set_xscale("symlog", linthresh=10)
            ax.set_xlabel("$t_0$ (iteration perturbed / spawned)")
            ax.set_ylabel(label)
            ax.set_title(f"{label} at $t_1$ = {t1}")
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    cfg = sums[0]["config"]
    tc = cfg["train"]
    fig.suptitle(f"Which basin the twins end in: {tc['model']} on {tc['data']}, {len(sums)} seed(s); "
                 + (f"lr changes at {list(lr_changes)}" if lr_changes else "constant learning rate"))
    return save_figure(fig, out_stem)
