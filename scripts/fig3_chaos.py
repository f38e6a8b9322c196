#!/usr/bin/env python
"""Figure 3 of arXiv 2505.13900 (the Chaos Effect) from a stored chaos grid.

Reproduces: heatmaps over (t0, t1) of the parameter dissimilarity 1 - cos(theta, theta'),
the loss barrier on the linear path between the twins (test subset), and the test-set
prediction disagreement, for twins perturbed at t0 and compared at t1 >= t0. Early t0
(chaotic phase) gives large values, late t0 (stable phase) small ones. The noise floor
(control twin, eps = 0, vs base) is printed on the figure.

Reads only stored results (nothing is recomputed): a chaos HDF5 file written by
`entk chaos --out CHAOS.h5`, or its `--summary` JSON. Takes a few seconds.

    python scripts/fig3_chaos.py CHAOS.h5 --out docs/results/fig3_chaos
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _load(path: str) -> dict:
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    from engine.analysis import load_chaos

    return load_chaos(path).summary()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="CHAOS.h5 (entk chaos --out) or CHAOS.json (--summary)")
    ap.add_argument("--out", default="fig3_chaos", help="output path without extension (.png and .pdf written)")
    ap.add_argument("--barrier", default="test", choices=["test", "train"], help="which loss barrier to plot")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from engine.analysis import chaos_grid

    summary = _load(args.results)
    recs = summary["records"]
    if not recs:
        print(f"{args.results}: no completed (t0, t1) pairs yet", file=sys.stderr)
        return 2
    panels = [("dissimilarity", r"parameter dissimilarity $1-\cos(\theta,\theta')$", True),
              (f"barrier_{args.barrier}", f"loss barrier ({args.barrier})", False),
              ("disagreement", "prediction disagreement (test)", False)]
    cfg = summary["config"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    for ax, (field, title, log) in zip(axes, panels, strict=True):
        t0s, t1s, m = chaos_grid(recs, field)
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
        fig.colorbar(im, ax=ax)
    floor = summary.get("noise_floor")
    tc = cfg["train"]
    fig.suptitle(f"Chaos Effect: {tc['model']} on {tc['data']}, eps={cfg['eps']} ({cfg['norm']}); "
                 f"noise floor (control vs base, L2) = {floor:.3g}")
    for ext in ("png", "pdf"):
        fig.savefig(f"{args.out}.{ext}", dpi=130)
    print(f"wrote {args.out}.png and {args.out}.pdf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
