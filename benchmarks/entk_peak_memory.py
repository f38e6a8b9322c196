"""Peak working memory of ``engine.ntk.entk`` against its ``budget_bytes``, each case in a fresh process.

``budget_bytes`` promises the working memory of a call: what it holds beyond its inputs, the
model and its result. Each child builds the model and inputs, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), reads VmRSS, runs one full-kernel ``entk`` call, and reads VmHWM;
working peak = VmHWM - VmRSS before - the result's bytes. Linux only.

Run: .venv/bin/python benchmarks/entk_peak_memory.py [--json benchmarks/results/entk-peak-memory-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# (model, N, budget GiB, compute dtype)
CASES = [("resnet20", 256, 1.0, "float32"), ("resnet20", 256, 2.0, "float32"),
         ("resnet20", 256, 1.0, "bfloat16"), ("vgg16", 32, 1.0, "float32"), ("vgg16", 32, 2.0, "float32"),
         ("cnn", 512, 0.5, "float32"), ("cnn", 512, 1.0, "float32")]

_CHILD = r"""
import json, sys, time
import torch
from engine.models import build_model
from engine.ntk import entk

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

name, n, gib, dtype = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = build_model(name).eval()
x = torch.randn(n, 3, 32, 32)
cd = None if dtype == "float32" else getattr(torch, dtype)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = kib("VmRSS")
t = time.perf_counter()
h = entk(model, x, budget_bytes=int(gib * (1 << 30)), compute_dtype=cd)
dt = time.perf_counter() - t
peak = kib("VmHWM")
out = h.numel() * h.element_size() / 1024
print(json.dumps({"model": name, "n": n, "budget_gib": gib, "compute_dtype": dtype, "seconds": dt,
                  "rss_before_gib": before / 2**20, "peak_gib": peak / 2**20, "result_gib": out / 2**20,
                  "working_peak_gib": (peak - before - out) / 2**20}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cases", help="comma-separated indices into CASES (default: all)")
    args = ap.parse_args()
    cases = CASES if not args.cases else [CASES[int(i)] for i in args.cases.split(",")]
    env = {"PYTHONPATH": os.environ.get("ENTK_TREE", str(Path(__file__).resolve().parents[1])), "PATH": "/usr/bin:/bin"}
    if "ENTK_HEAP" in os.environ:  # ENTK_HEAP=glibc: the same cases under glibc's own heap policy
        env["ENTK_HEAP"] = os.environ["ENTK_HEAP"]
    rows = []
    for name, n, gib, dtype in cases:
        p = subprocess.run([sys.executable, "-c", _CHILD, name, str(n), str(gib), dtype], capture_output=True,
                           text=True, check=True, env=env)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append(r)
        within = "within" if r["working_peak_gib"] <= gib else "OVER"
        print(f"{name:9s} N={n:4d} {dtype:9s} budget {gib:4.1f} GiB: working peak {r['working_peak_gib']:.2f} GiB "
              f"({within}; result {r['result_gib']:.2f} GiB, {r['seconds']:.1f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cases": rows, "heap": env.get("ENTK_HEAP", "engine")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
