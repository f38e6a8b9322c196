"""``entk reproduce`` as the report layer sees it: :func:`engine.jobs.study.run_study` does the
work (train → eNTKs → chaos grid → analysis); this module draws Figures 3–7 and the basin
figure, and writes ``report.md`` and ``report.html``."""

from __future__ import annotations

from pathlib import Path

from ..jobs.presets import Preset, preset
from ..jobs.study import hardware, lr_changes, run_study, transition_entry
from .basins import plot_basins
from .document import write_report
from .figures import plot_chaos, plot_cone, plot_growth, plot_kernel_diagnostics, plot_kernel_distance

__all__ = ["Preset", "draw_study", "hardware", "lr_changes", "preset", "reproduce", "transition_entry"]


def draw_study(out: Path, record: dict, per: dict, trans: list[dict]) -> dict:
    """The study's figures from its per-seed analysis: {key: [png, pdf]}."""
    seeds = record["seeds"]
    changes = record["lr_changes"]
    first = per[seeds[0]]
    summaries = [per[s]["summary"] for s in seeds]
    basin = next(t["iteration"] for t in trans if t["rule"] == "chaos_basin")
    cone_t = next(t["iteration"] for t in trans if t["rule"] == "cone")
    figs = {"fig3": plot_chaos(summaries, out / "figures" / "fig3_chaos", lr_changes=changes),
            "fig4": plot_kernel_distance(first["cone"], out / "figures" / "fig4_kernel_distance",
                                         lr_changes=changes, title=f"seed {seeds[0]}"),
            "fig5": plot_cone(first["cone"], out / "figures" / "fig5_cone",
                              chaos_t0=None if basin is None else round(basin), lr_changes=changes,
                              title=f"seed {seeds[0]}"),
            "fig6": plot_growth(summaries, out / "figures" / "fig6_growth", window=record["window"],
                                lr_changes=changes, transitions=trans),
            "fig7": plot_kernel_diagnostics([per[s]["diag"] for s in seeds], out / "figures" / "fig7_kernels",
                                            lr_changes=changes, cone_transition=cone_t)}
    if any(r["member"] == "independent" for s in summaries for r in s["records"]):
        figs["fig3b"] = plot_basins(summaries, out / "figures" / "fig3b_basins", lr_changes=changes)
    return figs


def reproduce(out_dir, **kw) -> dict:
    """Run (or resume) the whole study into ``out_dir`` and write its figures and report; the
    arguments are :func:`engine.jobs.study.run_study`'s. Returns the study record."""
    return run_study(out_dir, draw=draw_study, write=lambda out, record, per: write_report(out, record, per=per),
                     **kw)
