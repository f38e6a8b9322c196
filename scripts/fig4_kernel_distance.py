#!/usr/bin/env python
"""Figure 4 of arXiv 2505.13900 (kernel distance between checkpoints) from a stored kernel file.

Reproduces: the T x T matrix of kernel distances S(H_i, H_j) = 1 - <H_i, H_j>_F / (|H_i| |H_j|)
between the eNTKs of all checkpoints of one run, on a log(1 + t) grid, with the cone
transition (engine.analysis.cone: the first checkpoint from which all later kernels fit in
a cone at most rho times as wide as the whole trajectory's) marked by dashed lines. Early
checkpoints differ strongly from one another; after the transition the distances stay small.

Reads only the stored Gram /data/kernel_gram of an `entk ntk --out KERNELS.h5` file (nothing
is recomputed). Takes a few seconds.

    python scripts/fig4_kernel_distance.py KERNELS.h5 --out docs/results/fig4_kernel_distance
"""

from __future__ import annotations

import argparse
import math
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernels", help="KERNELS.h5 written by `entk ntk --out`")
    ap.add_argument("--out", default="fig4_kernel_distance",
                    help="output path without extension (.png and .pdf written)")
    ap.add_argument("--rho", type=float, default=0.5, help="cone transition parameter (see engine.analysis.cone)")
    args = ap.parse_args(argv)

    from engine.analysis import load_cone
    from engine.errors import EngineError
    from engine.report import plot_kernel_distance
    from engine.store import KernelStore

    try:
        a = load_cone(args.kernels, rho=args.rho)
        store = KernelStore(args.kernels)
        paths = plot_kernel_distance(a, args.out, title=f"{store.job.get('model', '?')} eNTK")
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cone transition at iteration {a.transition_iteration}; cone half-angle "
          f"{math.degrees(a.cone_half_angle):.3g} degrees")
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
