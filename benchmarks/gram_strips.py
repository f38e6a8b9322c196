"""Row strips against column strips for the upper triangle of a symmetric Gram tile, at the pipeline's shapes.

``engine.ntk.contract.gram_into`` multiplies only the upper triangle of a diagonal tile
``out (r, r) += a (r, w) @ aᵀ``, in strips of 128: a row strip ``out[r0:r1, r0:] += a[r0:r1] @
a[r0:]ᵀ`` has 128 rows and up to r columns; a column strip ``out[:c1, c0:c1] += a[:c1] @
a[c0:c1]ᵀ`` up to r rows and 128 columns. Both do the same multiply-adds. Each is timed (best of
``--reps``) against the full product, and reported as the triangle's rate: r²·w/2 multiply-adds
over the time (the full product's is half its own rate). w = 6336 and 8192 are the inner widths
resnet20's column chunks reach at N = 128 and above.

Run: .venv/bin/python benchmarks/gram_strips.py [--json benchmarks/results/gram-strips-cpu.json]   (about 1 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from _common import cpu_name

STRIP = 128


def _edges(rows: int) -> list[int]:
    strips = rows // STRIP
    return [round(i * rows / strips) for i in range(strips + 1)]


def _best(f, reps: int) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def _full(a, out) -> None:
    out.addmm_(a, a.T)


def _row_strips(a, out) -> None:
    for r0, r1 in itertools.pairwise(_edges(a.shape[0])):
        out[r0:r1, r0:].addmm_(a[r0:r1], a[r0:].T)


def _col_strips(a, out) -> None:
    for c0, c1 in itertools.pairwise(_edges(a.shape[0])):
        out[:c1, c0:c1].addmm_(a[:c1], a[c0:c1].T)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="320,640,1280,2560")
    ap.add_argument("--widths", default="2048,6336,8192")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows_out = []
    print(f"{'rows':>5} {'w':>5}  triangle GMAC/s: {'full':>5} {'row strips':>10} {'col strips':>10}")
    for r, w in itertools.product(map(int, args.rows.split(",")), map(int, args.widths.split(","))):
        a, out = torch.randn(r, w), torch.zeros(r, r)
        tri = r * r * w / 2
        rate = {name: tri / _best(lambda f=f, a=a, out=out: f(a, out), args.reps) / 1e9
                for name, f in (("full", _full), ("rows", _row_strips), ("cols", _col_strips))}
        rows_out.append({"rows": r, "w": w, **{f"{k}_gmacs": v for k, v in rate.items()}})
        print(f"{r:5d} {w:5d}  {'':16} {rate['full']:5.0f} {rate['rows']:10.0f} {rate['cols']:10.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                                         "strip": STRIP, "cases": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
