"""``report.md`` and a self-contained ``report.html`` (figures embedded) for a study."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.3g}"
    return str(v)


def _est(t: dict) -> str:
    if t["iteration"] is None:
        return "none found"
    spread = f" ± {t['spread']:.3g}" if t["spread"] is not None else " (one seed: no spread)"
    return f"{t['iteration']:.4g}{spread}"


def _mean_std(vals) -> str:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return "n/a"
    m = sum(v) / len(v)
    if len(v) < 2:
        return f"{m:.3g}"
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return f"{m:.3g} ± {sd:.2g}"


def guard_sentences(record: dict) -> list[str]:
    """The report's warnings: estimates that cannot be attributed to the training dynamics."""
    out = []
    changes, factor = record.get("lr_changes", []), record.get("lr_near_factor", 2.0)
    ch = record["chaos"]
    ck = record["train"]["checkpoints"]
    inside = [c for c in changes if min(ch["t0"]) < c <= max(ch["t1"]) or ck[0] < c <= ck[-1]]
    if inside:
        out.append(f"The learning rate changes at iteration(s) {inside}, inside the analysed window (chaos grid "
                   f"t0 {min(ch['t0'])}..t1 {max(ch['t1'])}, checkpoints {ck[0]}..{ck[-1]}): any change of "
                   f"behaviour there may be the schedule's, not the dynamics'.")
    for t in record.get("transitions", []):
        if t["iteration"] is None:
            continue
        if t["coincides_with_lr_change"]:
            out.append(f"The {t['rule']} estimate ({_est(t)}) lies within a factor of {factor:g} of a learning-rate "
                       f"change ({changes}): it cannot be attributed to the training dynamics.")
        if t["at_grid_edge"]:
            out.append(f"The {t['rule']} estimate ({_est(t)}) falls on the first or last point of its grid "
                       f"({t['grid'][0]}..{t['grid'][1]}) for at least one seed: the transition may lie outside "
                       f"the grid, so it cannot be attributed to the training dynamics.")
    return out


def basin_blocks(record: dict) -> list[tuple]:
    """Which rule answers the paper's question, and the barrier read-out per t1 (mean ± sd over seeds)."""
    basins = record.get("basins") or {}
    seeds = [str(s) for s in record.get("seeds", [])]
    if not basins or not all(basins.get(s) for s in seeds):
        return []
    out: list[tuple] = [("h2", "Which basin the twins end in"),
                        ("p", "The paper's Chaos Effect is about where training ends: a perturbation before the "
                              "transition sends the twin into another basin, one after it does not. `chaos_basin` "
                              "answers that question: it reads the test loss barrier between the base and its twin "
                              "at the last t1 against the barrier between the base and an independent run (two "
                              "basins by construction). The `sensitivity_*` rules measure how much a perturbation "
                              "grows inside a basin; they do not locate the transition.")]
    t = next((x for x in record.get("transitions", []) if x["rule"] == "chaos_basin"), None)
    if t is not None:
        sep = t.get("reference_separated")
        ref = ", ".join(_fmt(v) for v in t.get("reference_error_barrier", []))
        if not sep:
            out.append(("p", f"**The independent pair is not clearly in two basins** (its test error barrier per seed: "
                             f"{ref}; Frankle et al. call a pair stable below 0.02), so a twin's barrier has no "
                             f"scale to be read against here: the answer is not resolvable at this scale."))
        elif t["iteration"] is None:
            out.append(("p", "Every twin of the grid, up to the last t0, ends further from the base than "
                             f"{record.get('basin_frac', 0.1):g} of the independent pair's barrier for some seed: "
                             "no t0 of this grid is past the transition."))
        elif t["at_grid_edge"]:
            out.append(("p", f"chaos_basin = {_est(t)} lies on the edge of the t0 grid for some seed: at the first t0 "
                             f"the twins already end in the base's basin (the transition, if any, lies before it), "
                             f"or only the last t0 qualifies."))
        else:
            out.append(("p", f"chaos_basin = {_est(t)}: perturbations before it end in another basin, "
                             f"perturbations from it on in the base's."))
    for t1 in sorted({int(k) for s in seeds for k in basins[s]}):
        rows = [("pair", "t0", "loss barrier", "error barrier", "disagreement", "L2")]
        cells = [basins[s].get(str(t1)) for s in seeds]
        if not all(cells):
            continue
        f4 = ("barrier_test", "error_barrier_test", "disagreement", "l2")
        for t0 in sorted({int(k) for c in cells for k in c["twins"]}):
            rows.append(("twin", str(t0), *(_mean_std([c["twins"].get(str(t0), {}).get(f) for c in cells])
                                            for f in f4)))
        for t0 in sorted({int(k) for c in cells for k in c["spawn"]}):
            rows.append(("spawn", str(t0), *(_mean_std([c["spawn"].get(str(t0), {}).get(f) for c in cells])
                                             for f in f4)))
        rows.append(("independent", "0", *(_mean_std([c["independent"].get(f) for c in cells]) for f in f4)))
        out += [("h3", f"t1 = {t1}"), ("table", rows)]
    return out


def _blocks(record: dict, per: dict) -> list[tuple]:
    tr, ch, est = record["train"], record["chaos"], record["estimates"]
    seeds = record.get("seeds", [0])
    data_note = ("synthetic CIFAR-shaped data (no CIFAR-10 location was given; pass "
                 "`--data cifar10 --data-root PATH` for the real data set)" if record.get("synthetic")
                 else f"CIFAR-10 from `{tr['data_root']}`")
    cone0, sum0 = per[seeds[0]]
    size = len(cone0.iterations)
    win = record.get("window")
    changes = record.get("lr_changes", [])
    sched = (f"{tr['schedule']}" + (f", milestones {tr['milestones']} (lr changes at {changes})"
                                    if tr["schedule"] == "multistep" else "")
             + (f", warmup {tr['warmup_steps']} steps" if tr.get("warmup_steps") else ""))
    accs = record["train_result"]
    acc = ", ".join(f"seed {s}: train {_fmt(accs[str(s)]['train_acc'])} / test {_fmt(accs[str(s)]['test_acc'])}"
                    for s in seeds if str(s) in accs)
    used = sum0.get("used") or {}
    blocks: list[tuple] = [
        ("h1", "Two-phase learning dynamics: reproduction report"),
        ("p", f"Reproduces the Chaos Effect (Fig. 3) and the Cone Effect (Figs. 4, 5) of Zhou, Yang, Sugiyama "
              f"and Yan, *New Evidence of the Two-Phase Learning Dynamics of Neural Networks* (arXiv 2505.13900) "
              f"for **{tr['model']}** on {data_note}, preset `{record['preset']}` ({record['preset_description']}), "
              f"with the controls the paper's claims need: the learning-rate schedule, growth over a fixed window, "
              f"{len(seeds)} seed(s) and the edges of every grid."),
        ("h2", "Configuration"),
        ("table", [("item", "value"),
                   ("model / data", f"{tr['model']} / {tr['data']}" + (f", {tr['n_train']} training images"
                                                                       if tr.get("n_train") else "")
                    + (f", data {used.get('data_fingerprint')}" if used.get("data_fingerprint") else "")),
                   ("training", f"{tr['steps']} SGD steps, batch {tr['batch_size']}, lr {tr['lr']} ({sched}), "
                                f"momentum {tr['momentum']}, weight decay {tr['weight_decay']}"),
                   ("seeds", f"{seeds} (initialisation, data order and perturbation directions; same data subset)"),
                   ("checkpoints", f"{len(tr['checkpoints'])}: {tr['checkpoints'][:12]}"
                                   + (" ..." if len(tr["checkpoints"]) > 12 else "")),
                   ("eNTK", f"{record['probe']} seeded class-balanced test images, full kernel, BatchNorm in eval "
                            f"mode, {size} checkpoints"),
                   ("chaos grid", f"t0 = {ch['t0']}, t1 = {ch['t1']}, eps = {ch['eps']} ({ch['norm']} norm), "
                                  f"metrics on {used.get('eval_train', ch['eval_train'])} train / "
                                  f"{used.get('eval_test', ch['eval_test'])} test images; divergence traced every "
                                  f"{ch['trace_every']} steps; growth window {win} steps"
                                  + (f"; **the grid was cut short: completed up to t1 = "
                                     f"{record['chaos_completed_t1']} of {max(ch['t1'])}**"
                                     if record.get("chaos_completed_t1", max(ch["t1"])) < max(ch["t1"]) else "")),
                   ("final accuracy", acc)]),
        ("h2", "Hardware and time"),
        ("table", [("stage", "seconds")] + [(k, f"{v:.1f}") for k, v in record["times_s"].items()]
         + [("total", f"{sum(record['times_s'].values()):.1f}"), ("hardware", record["hardware"])]),
        ("h2", "Transition estimates"),
        ("p", f"Mean over the seeds that give an estimate ± the sample standard deviation. An estimate "
              f"\"near an lr change\" lies within a factor of {record.get('lr_near_factor', 2.0):g} of one "
              f"(about one step of the log-spaced grids); \"at grid edge\" means some seed's estimate is the "
              f"first or last point of the rule's grid."),
        ("table", [("rule", "estimate (iteration)", "per seed", "near an lr change", "at grid edge")]
         + [(t["rule"], _est(t), str(t["per_seed"]), "yes" if t["coincides_with_lr_change"] else "no",
             "yes" if t["at_grid_edge"] else "no") for t in record["transitions"]]),
    ]
    for t in record["transitions"]:
        blocks.append(("p", f"`{t['rule']}`: {t['description'].rstrip('.')}."))
    blocks += basin_blocks(record)
    warn = guard_sentences(record)
    blocks.append(("h3", "What these estimates can and cannot say"))
    if warn:
        blocks += [("p", "**Warning.** " + w) for w in warn]
    else:
        blocks.append(("p", "No estimate falls near a learning-rate change or on the edge of its grid"
                            + (" (the learning rate is constant over the whole run)." if not changes else ".")))
    none = [t["rule"] for t in record["transitions"] if t["iteration"] is None]
    if none:
        blocks.append(("p", f"No transition was found by: {', '.join(none)} (on this grid, in this run)."))
    growth = record.get("growth", {})
    t0s = sorted(int(k) for k in growth[str(seeds[0])]["rates"]) if growth else []
    last_t1 = record.get("chaos_completed_t1", max(ch["t1"]))
    rows = [("t0", f"growth rate over [t0, t0+{win}] (1/iteration)", f"dissimilarity at t0+{win}",
             f"dissimilarity at t1 = {last_t1}")]
    for t0 in t0s:
        ends = []
        for s in seeds:
            recs = per[s][1]["records"]
            ends.append(next((r["dissimilarity"] for r in recs if r["member"] == "perturbed" and r["t0"] == t0
                              and r["t1"] == last_t1), None))
        rows.append((str(t0), _mean_std([growth[str(s)]["rates"][str(t0)] for s in seeds]),
                     _mean_std([growth[str(s)]["window_dissimilarity"][str(t0)] for s in seeds]), _mean_std(ends)))
    blocks += [("h2", "Growth of perturbations"), ("table", rows),
               ("p", f"Noise floor (control twin vs base, L2, all seeds): {_fmt(est['noise_floor'])}. Cone half-angle "
                     f"after the cone transition: {est['cone_half_angle_deg']:.2f} degrees (seed mean).")]
    figs = record["figures"]
    s = cone0.distance
    late = s[cone0.transition_index:, cone0.transition_index:]
    kd = record.get("kernels", {}).get(str(seeds[0]))
    kd_text = ""
    if kd:
        kd_text = (f" For seed {seeds[0]}: the kernel-label alignment goes from {_fmt(kd['alignment'][0])} at "
                   f"iteration 0 to {_fmt(kd['alignment'][-1])} at the end; the effective rank from "
                   f"{_fmt(kd['effective_rank'][0])} to {_fmt(kd['effective_rank'][-1])}; the distance to the "
                   f"final kernel falls from {_fmt(kd['distance_to_final'][0])}.")
    lr_note = f" Learning-rate changes are drawn as grey dash-dot lines ({changes})." if changes else ""
    fig_text = {
        "fig3": ("Figure 3 (Chaos Effect)",
                 f"Dissimilarity, loss barrier and prediction disagreement of twins perturbed at t0 and compared "
                 f"with the base at t1 (mean over {len(seeds)} seed(s)). Comparing at one absolute t1 gives a later "
                 f"t0 less time to diverge; Figure 6 compares over a fixed window instead.{lr_note}"),
        "fig3b": ("Figure 3b (which basin the twins end in)",
                  "Test loss barrier (top) and error barrier (bottom) between the base and its twin against t0, one "
                  "column per t1; the independent pair (another initialisation, orange band: min-max over seeds) "
                  "and the spawn pairs (green squares at their t0) give the scale of two basins; the dashed line "
                  f"is the chaos_basin threshold.{lr_note}"),
        "fig4": ("Figure 4 (kernel distance between checkpoints)",
                 f"Seed {seeds[0]}: kernel distances reach {_fmt(float(s.max()))} across the whole run and stay "
                 f"below {_fmt(float(late.max()))} among checkpoints after iteration "
                 f"{cone0.transition_iteration}.{lr_note}"),
        "fig5": ("Figure 5 (the cone)",
                 f"Seed {seeds[0]}: (a) distance to reference checkpoints, (b) kernel velocity, (c) polar view, "
                 f"(d) MDS of the angular distances, (e) the suffix half-angle that defines the cone transition "
                 f"({cone0.transition_iteration}).{lr_note}"),
        "fig6": ("Figure 6 (growth of perturbations)",
                 f"(a) The L2 distance of every perturbed twin to its base over time; (b) the finite-time growth rate "
                 f"over [t0, t0 + {win}] with the growth-rule transition; (c) the dissimilarity at the fixed window "
                 f"against the one at the last t1. Bands: min-max over seeds.{lr_note}"),
        "fig7": ("Figure 7 (kernel-trajectory diagnostics)",
                 "Per checkpoint: (a) centred kernel alignment of the output-traced eNTK with the probe labels' "
                 "one-hot Gram, (b) the top eigenvalues of the eNTK, (c) its effective rank, (d) its distance "
                 f"S = 1 - cos to the final kernel.{kd_text}{lr_note}"),
    }
    blocks.append(("h2", "Figures"))
    for key in ("fig3b", "fig3", "fig4", "fig5", "fig6", "fig7"):
        if key not in figs:
            continue
        title, sentence = fig_text[key]
        png = next(f for f in figs[key] if f.endswith(".png"))
        blocks.append(("h3", title))
        blocks.append(("p", sentence))
        blocks.append(("img", png, title))
    return blocks


def _markdown(blocks) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "table":
            rows = b[1]
            out.append("| " + " | ".join(rows[0]) + " |")
            out.append("|" + "---|" * len(rows[0]))
            out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        out.append("")
    return "\n".join(out)


def _html(blocks, root: Path) -> str:
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            text = html.escape(b[1]).replace("**", "")
            body.append(f"<p>{text}</p>")
        elif kind == "table":
            rows = b[1]
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                            for r in rows[1:])
            body.append(f"<table><tr>{head}</tr>{cells}</table>")
        elif kind == "img":
            data = base64.b64encode((root / b[1]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>entk reproduction report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write_report(out_dir: str | Path, record: dict, *, per: dict) -> list[Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths.

    ``per`` maps each seed to its (cone analysis, chaos summary)."""
    root = Path(out_dir)
    blocks = _blocks(record, per)
    md, page = root / "report.md", root / "report.html"
    md.write_text(_markdown(blocks))
    page.write_text(_html(blocks, root))
    return [md, page]


__all__ = ["guard_sentences", "write_report"]
