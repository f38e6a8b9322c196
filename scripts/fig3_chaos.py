#!/usr/bin/env python
"""Figure 3 of arXiv 2505.13900 (the Chaos Effect) from a stored chaos grid.

Reproduces: heatmaps over (t0, t1) of the parameter dissimilarity 1 - cos(theta, theta'),
the loss barrier on the linear path between the twins (test subset), and the test-set
prediction disagreement, for twins perturbed at t0 and compared at t1 >= t0. Early t0
(chaotic phase) gives large values, late t0 (stable phase) small ones. The noise floor
(control twin, eps = 0, vs base) is printed on the figure.

Reads only stored results (nothing is recomputed): a chaos HDF5 file written by
`entk chaos --out CHAOS.h5`, or its `--json` summary. Takes a few seconds.

    python scripts/fig3_chaos.py CHAOS.h5 --out docs/results/fig3_chaos
"""

from __future__ import annotations

import argparse
import json
import sys


def _load(path: str) -> dict:
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    from engine.jobs import load_chaos

    return load_chaos(path).summary()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="CHAOS.h5 (entk chaos --out) or CHAOS.json (entk chaos --json)")
    ap.add_argument("--out", default="fig3_chaos", help="output path without extension (.png and .pdf written)")
    ap.add_argument("--barrier", default="test", choices=["test", "train"], help="which loss barrier to plot")
    args = ap.parse_args(argv)

    from engine.report import plot_chaos

    summary = _load(args.results)
    if not summary["records"]:
        print(f"{args.results}: no completed (t0, t1) pairs yet", file=sys.stderr)
        return 2
    paths = plot_chaos(summary, args.out, barrier=args.barrier)
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
