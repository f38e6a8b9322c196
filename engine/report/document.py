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


def _blocks(record: dict, cone, chaos_summary: dict) -> list[tuple]:
    tr, ch, est = record["train"], record["chaos"], record["estimates"]
    data_note = ("synthetic CIFAR-shaped data (no CIFAR-10 location was given; pass "
                 "`--data cifar10 --data-root PATH` for the real data set)" if record.get("synthetic")
                 else f"CIFAR-10 from `{tr['data_root']}`")
    recs = chaos_summary["records"]
    last_t1 = max(r["t1"] for r in recs)
    pert = sorted((r for r in recs if r["member"] == "perturbed" and r["t1"] == last_t1), key=lambda r: r["t0"])
    size = len(cone.iterations)
    blocks: list[tuple] = [
        ("h1", "Two-phase learning dynamics: reproduction report"),
        ("p", f"Reproduces the Chaos Effect (Fig. 3) and the Cone Effect (Figs. 4, 5) of Zhou, Yang, Sugiyama "
              f"and Yan, *New Evidence of the Two-Phase Learning Dynamics of Neural Networks* (arXiv 2505.13900) "
              f"for **{tr['model']}** on {data_note}, preset `{record['preset']}` ({record['preset_description']})."),
        ("h2", "Configuration"),
        ("table", [("item", "value"),
                   ("model / data", f"{tr['model']} / {tr['data']}" + (f", {tr['n_train']} training images"
                                                                       if tr.get("n_train") else "")),
                   ("training", f"{tr['steps']} SGD steps, batch {tr['batch_size']}, lr {tr['lr']} "
                                f"({tr['schedule']}, milestones {tr['milestones']}), momentum {tr['momentum']}, "
                                f"weight decay {tr['weight_decay']}, seed {tr['seed']}"),
                   ("checkpoints", f"{len(tr['checkpoints'])}: {tr['checkpoints'][:12]}"
                                   + (" ..." if len(tr["checkpoints"]) > 12 else "")),
                   ("eNTK", f"{record['probe']} seeded class-balanced test images, full kernel, BatchNorm in eval "
                            f"mode, {size} checkpoints"),
                   ("chaos grid", f"t0 = {ch['t0']}, t1 = {ch['t1']}, eps = {ch['eps']} ({ch['norm']} norm), "
                                  f"metrics on {ch['eval_train']} train / {ch['eval_test']} test images"),
                   ("final accuracy", f"train {_fmt(record['train_result']['train_acc'])}, "
                                      f"test {_fmt(record['train_result']['test_acc'])}")]),
        ("h2", "Hardware and time"),
        ("table", [("stage", "seconds")] + [(k, f"{v:.1f}") for k, v in record["times_s"].items()]
         + [("hardware", record["hardware"])]),
        ("h2", "Results"),
        ("table", [("estimate", "value"),
                   ("noise floor (control twin vs base, L2)", _fmt(est["noise_floor"])),
                   ("cone transition (iteration)", _fmt(est["cone_transition_iteration"])),
                   ("cone half-angle after the transition", f"{est['cone_half_angle_deg']:.2f} degrees"),
                   ("chaos transition (t0)", _fmt(est["chaos_transition_t0"]))]),
        ("p", f"Cone rule: {est['cone_rule'].rstrip('.')}. Chaos rule: the first t0 whose dissimilarity at "
              f"t1 = {last_t1} is at or below the geometric midpoint between the earliest t0's level and the "
              f"last t0's level."),
        ("p", "Dissimilarity 1 - cos at t1 = " + str(last_t1) + ": "
              + ", ".join(f"t0={r['t0']}: {_fmt(r['dissimilarity'])}" for r in pert) + "."),
    ]
    figs = record["figures"]
    s = cone.distance
    late = s[cone.transition_index:, cone.transition_index:]
    fig_text = {
        "fig3": ("Figure 3 (Chaos Effect)",
                 f"Twins perturbed at early t0 drift apart (dissimilarity up to "
                 f"{_fmt(max(r['dissimilarity'] for r in pert))}) "
                 f"while twins perturbed late stay together; the control twin stays at {_fmt(est['noise_floor'])}."),
        "fig4": ("Figure 4 (kernel distance between checkpoints)",
                 f"Kernel distances reach {_fmt(float(s.max()))} across the whole run but stay below "
                 f"{_fmt(float(late.max()))} among checkpoints after iteration {est['cone_transition_iteration']}."),
        "fig5": ("Figure 5 (the cone)",
                 f"The eNTK keeps moving after the transition yet stays within a cone of half-angle "
                 f"{est['cone_half_angle_deg']:.1f} degrees: (a) distance to reference checkpoints, (b) kernel "
                 f"velocity, (c) polar view, (d) MDS of the angular distances."),
    }
    blocks.append(("h2", "Figures"))
    for key in ("fig3", "fig4", "fig5"):
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


def write_report(out_dir: str | Path, record: dict, *, cone, chaos_summary: dict) -> list[Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths."""
    root = Path(out_dir)
    blocks = _blocks(record, cone, chaos_summary)
    md, page = root / "report.md", root / "report.html"
    md.write_text(_markdown(blocks))
    page.write_text(_html(blocks, root))
    return [md, page]


__all__ = ["write_report"]
