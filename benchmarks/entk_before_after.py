"""Side-by-side timing of ``engine.ntk.entk`` and ``engine.ntk.jacobian`` from two source trees, in
one run.

Each tree runs in its own subprocess (``PYTHONPATH=<tree>``), the trees alternate round by
round, and each round of each case reports the best of ``--reps`` calls; the torch.mm float32
rate (1024², best of 3) and the 1-minute load average are measured in every subprocess, so a
drift of the shared machine shows in the numbers it sits beside.

Run: .venv/bin/python benchmarks/entk_before_after.py --before /tmp/ntk-base --after . \
     [--rounds 3] [--reps 3] [--json benchmarks/results/entk-before-after-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# (front end, model, N): entk's full kernel, and jacobian's J (bench_ntk.py's jacobian-<model> groups)
CASES = [("entk", "resnet20", 32), ("entk", "cnn", 64), ("jacobian", "resnet20", 64), ("jacobian", "cnn", 64)]

_CHILD = r"""
import json, os, sys, time
import torch
from engine.models import build_model
from engine.ntk import entk, jacobian
reps = int(sys.argv[1]); out = {}
a = torch.randn(1024, 1024); torch.mm(a, a); best = float("inf")
for _ in range(3):
    t0 = time.perf_counter(); torch.mm(a, a); best = min(best, time.perf_counter() - t0)
out["mm_gflops"] = 1024 ** 3 / best / 1e9
for fe, name, n in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fn = {"entk": entk, "jacobian": jacobian}[fe]
    h = fn(model, x)  # warm-up
    check = float(h.double().trace()) if fe == "entk" else float(h.double().square().sum())
    del h
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(model, x); ts.append(time.perf_counter() - t0)
    out[f"{fe}-{name}-N{n}"] = {"best_s": min(ts), "times_s": ts, "check": check}
out["load_avg_1min"] = os.getloadavg()[0]
print(json.dumps(out))
"""


def _run(tree: str, reps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    p = subprocess.run([sys.executable, "-c", _CHILD, str(reps), json.dumps(CASES)], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="source tree with the engine/ package before")
    ap.add_argument("--after", default=".", help="source tree after (default: .)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write all rounds here")
    a = ap.parse_args()
    rounds = []
    for r in range(a.rounds):
        for label, tree in (("before", a.before), ("after", a.after)):
            res = _run(tree, a.reps)
            rounds.append({"round": r, "tree": label, **res})
            cases = "  ".join(f"{k} {v['best_s'] * 1e3:8.1f} ms" for k, v in res.items() if isinstance(v, dict))
            print(f"round {r} {label:<6} {cases}  mm {res['mm_gflops']:6.1f} GFLOP/s  load {res['load_avg_1min']:.2f}",
                  flush=True)
    for fe, name, n in CASES:
        k = f"{fe}-{name}-N{n}"
        b = min(x[k]["best_s"] for x in rounds if x["tree"] == "before")
        f = min(x[k]["best_s"] for x in rounds if x["tree"] == "after")
        cb = next(x[k]["check"] for x in rounds if x["tree"] == "before")
        cf = next(x[k]["check"] for x in rounds if x["tree"] == "after")
        print(f"{k}: before {b * 1e3:.1f} ms, after {f * 1e3:.1f} ms, after/before {f / b:.3f}; "
              f"check (trace of K, or |J|^2) relative difference {abs(cf - cb) / abs(cb):.2e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"cpu": _cpu(), "torch_threads": os.cpu_count(), "rounds": rounds}, fh, indent=1)
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
