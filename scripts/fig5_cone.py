#!/usr/bin/env python
"""Figure 5 of arXiv 2505.13900 (the Cone Effect) from a stored kernel file.

Reproduces: (a) the kernel distance S(theta_tau, theta_t) from reference checkpoints tau,
(b) the distance between checkpoints k apart and the same per iteration, (c) a polar view
(angle to H_0, relative norm) with the cone drawn, (d) a classical MDS map of the angles
between kernels, and (e) the suffix half-angle that defines the cone transition
(engine.analysis.cone: the first checkpoint from which all later kernels fit in a cone at most
rho times as wide as the whole trajectory's). After the transition the kernel keeps moving
but stays in a narrow cone. With --chaos, the Chaos Effect transition (first t0 whose twin
dissimilarity at the largest t1 falls half-way, in log space, from its early to its late
level) is marked too, to compare the two phases.

Reads only stored results (nothing is recomputed): the Gram /data/kernel_gram of an
`entk ntk --out KERNELS.h5` file and optionally an `entk chaos` file (or its --json summary).
Takes a few seconds.

    python scripts/fig5_cone.py KERNELS.h5 --out docs/results/fig5_cone --chaos CHAOS.h5
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _chaos_records(path: str) -> list[dict]:
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)["records"]
    from engine.jobs import load_chaos

    return load_chaos(path).records()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernels", help="KERNELS.h5 written by `entk ntk --out`")
    ap.add_argument("--out", default="fig5_cone", help="output path without extension (.png and .pdf written)")
    ap.add_argument("--chaos", help="CHAOS.h5 (entk chaos --out) or its --json summary: mark the chaos transition")
    ap.add_argument("--taus", type=_ints, help="reference checkpoints for panel (a), e.g. 0,10,100 "
                    "(default: 4 spread in log space)")
    ap.add_argument("--lags", type=_ints, default=[1, 2, 4], help="lags in checkpoint steps for panel (b) "
                    "(default 1,2,4)")
    ap.add_argument("--rho", type=float, default=0.5, help="cone transition parameter (see engine.analysis.cone)")
    args = ap.parse_args(argv)

    from engine.analysis import chaos_transition_of, load_cone
    from engine.errors import EngineError
    from engine.report import plot_cone
    from engine.store import KernelStore

    try:
        a = load_cone(args.kernels, rho=args.rho)
        store = KernelStore(args.kernels)
        chaos_t0 = None
        if args.chaos:
            records = _chaos_records(args.chaos)
            if not records:
                print(f"{args.chaos}: no completed (t0, t1) pairs yet", file=sys.stderr)
                return 2
            chaos_t0, per_t0 = chaos_transition_of(records)
            print(f"chaos transition t0: {chaos_t0 if chaos_t0 is not None else 'not determinable'} "
                  f"(dissimilarity at the largest t1 by t0: {per_t0})")
        paths = plot_cone(a, args.out, taus=args.taus, lags=args.lags, chaos_t0=chaos_t0,
                          title=f"{store.job.get('model', '?')} eNTK")
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cone transition at iteration {a.transition_iteration} (checkpoint {a.transition_index}); "
          f"cone half-angle {math.degrees(a.cone_half_angle):.3g} degrees "
          f"(whole trajectory {math.degrees(a.suffix_half_angle[0]):.3g} degrees)")
    print(f"rule: {a.rule}")
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
