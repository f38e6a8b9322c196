"""The engine's heap policy (engine/heap.py) against glibc's own, side by side: time and working peak.

Each arm runs in a fresh process (the policy is process-wide): ``ENTK_HEAP=engine`` (the default:
glibc keeps freed memory during a call) and ``ENTK_HEAP=glibc`` (glibc's own policy throughout).
A child builds the model and inputs, then makes ``--calls`` full-kernel ``entk`` calls and reports
each call's wall time, the process's page faults during it (``getrusage``) and the first call's
working peak (VmHWM less VmRSS before, less the result). The arms alternate for ``--rounds``
rounds, so both see the machine's load of the moment. Linux only.

Run: .venv/bin/python benchmarks/heap_policy.py [--cases resnet20:128,resnet20:256] [--rounds 3] \
     [--json benchmarks/results/heap-policy-cpu.json]     (about 6 min on 2 cores for the default)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import cpu_name

_CHILD = r"""
import json, resource, sys, time
import torch
from engine import heap
from engine.models import build_model
from engine.ntk import entk

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

name, n, calls, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.manual_seed(0)
model = build_model(name).eval()
x = torch.randn(n, 3, 32, 32)
out = []
for i in range(calls):
    if i == 0:
        open("/proc/self/clear_refs", "w").write("5")
        before = kib("VmRSS")
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    h = entk(model, x, contraction="materialise", budget_bytes=int(budget * (1 << 30)))
    dt = time.perf_counter() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    if i == 0:
        peak = (kib("VmHWM") - before) / 2**20 - h.numel() * h.element_size() / 2**30
    out.append({"seconds": dt, "minor_faults": faults})
print(json.dumps({"calls": out, "working_peak_gib": peak, "policy": heap.describe(),
                  "threads": torch.get_num_threads()}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="resnet20:128,resnet20:256", help="model:N,... (full kernel, float32)")
    ap.add_argument("--budget-gb", type=float, default=4.0)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    root = str(Path(__file__).resolve().parents[1])
    rows = []
    for case in args.cases.split(","):
        name, n = case.split(":")
        for r in range(args.rounds):
            for arm in ("engine", "glibc"):
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                env.update(PYTHONPATH=root, ENTK_HEAP=arm)
                p = subprocess.run([sys.executable, "-c", _CHILD, name, n, str(args.calls), str(args.budget_gb)],
                                   capture_output=True, text=True, check=True, env=env)
                res = json.loads(p.stdout.strip().splitlines()[-1])
                res.update(model=name, n=int(n), round=r, arm=arm, budget_gib=args.budget_gb)
                rows.append(res)
                secs = " ".join(f"{c['seconds']:.2f}s/{c['minor_faults'] / 1e3:.0f}k" for c in res["calls"])
                print(f"{name} N={n} round {r} {arm:6s}: calls {secs} (time/minor faults), "
                      f"working peak {res['working_peak_gib']:.2f} GiB", flush=True)
    print("\nbest call per arm (s), median first call (s), max working peak (GiB):")
    for case in args.cases.split(","):
        name, n = case.split(":")
        for arm in ("engine", "glibc"):
            rs = [r for r in rows if r["model"] == name and r["n"] == int(n) and r["arm"] == arm]
            best = min(c["seconds"] for r in rs for c in r["calls"])
            firsts = sorted(r["calls"][0]["seconds"] for r in rs)
            print(f"  {name} N={n} {arm:6s}: best {best:.2f}  first {firsts[len(firsts) // 2]:.2f}  "
                  f"peak {max(r['working_peak_gib'] for r in rs):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
