"""Where the one-pass eNTK's time goes, stage by stage, against each stage's FLOP floor.

One full symmetric (N·C) × (N·C) kernel of a freshly initialised model in eval mode at N random
CIFAR-shaped inputs (C = 10), ``engine.ntk.entk(model, x, contraction="materialise")`` unless
``--contraction`` says otherwise. Stages are timed by wrapping the driver's functions
(inclusive wall time, best call of ``--reps``):

* ``forward+backward``: the forward with hooks and the K output-gradient backward passes;
* ``fill``: forming the column chunks, of which ``unfold`` (conv patches), ``bmm`` (per-sample
  weight gradients, their scaling and the copy into the chunk) are the parts measured inside;
* ``gram``: the chunk products into the kernel tile; ``pairs/closed``: spatial-pair and closed-form
  contributions; ``symmetrize``: mirroring the upper triangle; ``other``: the rest.

Each stage's floor is its multiply-adds at the torch.mm rate measured in the same process (the
Gram's at its own shape, the rest at 1024³): backward-data = K × the forward MACs of the layers
whose input needs a gradient; formation = K × each materialised layer's forward MACs; Gram =
(N·K)(N·K + 1)/2 × columns. A ``torch.profiler`` table of the ops with the most self time follows.

``--trees A B ...`` reruns this script under each source tree (``PYTHONPATH=<tree>``) in turn,
``--rounds`` times, so that a before/after comparison shares the machine's load of the moment.

Run: .venv/bin/python benchmarks/profile_ntk_stages.py [--model resnet20 --n 32] \
     [--trees /tmp/ntk-base .] [--json benchmarks/results/ntk-stages-<hw>.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

C = 10
_clock = time.perf_counter  # --clock cpu: time.process_time


def _rate(m: int, k: int, n: int, dtype) -> float:
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = _clock()
        torch.mm(a, b)
        best = min(best, _clock() - t0)
    return m * k * n / best


class _Timers:
    """Inclusive wall time of wrapped module functions, summed per label."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self._undo = []

    def wrap(self, mod, name: str, label: str) -> None:
        fn = getattr(mod, name, None)
        if fn is None:
            return

        def timed(*a, **kw):
            t0 = _clock()
            try:
                return fn(*a, **kw)
            finally:
                self.t[label] = self.t.get(label, 0.0) + _clock() - t0

        setattr(mod, name, timed)
        self._undo.append((mod, name, fn))

    def restore(self) -> None:
        for mod, name, fn in reversed(self._undo):
            setattr(mod, name, fn)
        self._undo.clear()


def _floors(model, x, dtype, contraction: str) -> dict:
    """Each stage's multiply-adds and floor seconds, rated as benchmarks/bench_ntk_contraction.py
    rates its floor: each layer's at the torch.mm rate of its dominant GEMM shape (capped at 4096
    rows and columns), the backward-data passes at the float32 1024³ rate."""
    import torch

    from engine.ntk import plan

    pl = plan(model, x, compute_dtype=dtype if dtype == torch.bfloat16 else None, contraction=contraction)
    n, k = pl.n1, pl.k
    rates: dict = {}

    def rate(shape, dt):
        shape = (min(shape[0], 4096), shape[1], min(shape[2], 4096))
        if (shape, dt) not in rates:
            rates[shape, dt] = _rate(*shape, dt)
        return rates[shape, dt]

    mm = rate((1024, 1024, 1024), torch.float32)
    macs = {"forward+backward": pl.backward_macs, "fill": 0, "gram": 0, "pairs/closed": 0}
    floor = {"forward+backward": pl.backward_macs / mm, "fill": 0.0, "gram": 0.0, "pairs/closed": 0.0}
    for lc in pl.layers:
        cost = lc.chosen
        r = rate(cost.gemm or (1024, 1024, 1024), dtype)
        if lc.strategy == "pairs":
            macs["pairs/closed"] += cost.macs
            floor["pairs/closed"] += cost.macs / r
            continue
        g = n * k * (n * k + 1) // 2 * lc.columns
        macs["gram"] += g
        macs["fill"] += cost.macs - g
        floor["gram"] += g / r
        floor["fill"] += (cost.macs - g) / r
    return {"mm_macs_per_s": mm, "macs": macs, "floor_s": floor,
            "mm_rates": [{"shape": list(sh), "dtype": str(dt), "macs_per_s": v} for (sh, dt), v in rates.items()]}


def _child(a) -> dict:
    import torch

    from engine.models import build_model
    from engine.ntk import entk, onepass
    from engine.ntk.rules import conv, linear

    global _clock
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu":
        _clock = time.process_time
    dtype = getattr(torch, a.dtype)
    cd = torch.bfloat16 if dtype == torch.bfloat16 else None
    torch.manual_seed(0)
    model = build_model(a.model, num_classes=C).eval()
    x = torch.randn(a.n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    load_before = os.getloadavg()[0]

    def call():
        return entk(model, x, contraction=a.contraction, compute_dtype=cd)

    h = call()  # warm-up
    ref_trace = float(h.double().trace())
    del h
    timers = _Timers()
    best, stages = float("inf"), {}
    for _ in range(a.reps):
        timers.t = {}
        for mod, name, label in [(onepass, "_forward_backward", "forward+backward"), (onepass, "_fill", "fill"),
                                 (onepass, "contract", "gram"), (onepass, "pair_gram", "pairs/closed"),
                                 (onepass, "symmetrize", "symmetrize"), (conv, "patches", "fill: unfold"),
                                 (conv, "bmm_into", "fill: bmm"),
                                 (linear, "bmm_into", "fill: bmm")]:
            timers.wrap(mod, name, label)
        t0 = _clock()
        try:
            call()
        finally:
            total = _clock() - t0
            timers.restore()
        if total < best:
            best, stages = total, dict(timers.t)
    top = {k: v for k, v in stages.items() if not k.startswith("fill:")}
    stages["other"] = best - sum(top.values())
    fl = _floors(model, x, dtype, a.contraction)
    prof = None
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as p:
            call()
        ops = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:a.profile]
        prof = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops]
    return {"clock": a.clock, "model": a.model, "n": a.n, "dtype": a.dtype, "contraction": a.contraction,
            "total_s": best,
            "stages_s": stages, "threads": torch.get_num_threads(), "trace": ref_trace, "ops": prof,
            "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0], **fl,
            "share_of_floor": sum(fl["floor_s"].values()) / best}


def _print(res: dict, label: str = "") -> None:
    fl = res["floor_s"]
    floor = sum(fl.values())
    print(f"{label}{res['model']} N={res['n']} {res['dtype']} {res['contraction']}: {res['total_s']:.3f} s, "
          f"{res['threads']} threads, {res['clock']} clock, floor {floor:.3f} s, share {res['share_of_floor']:.2f}; "
          f"mm 1024³ {res['mm_macs_per_s'] / 1e9:.1f} GMAC/s; "
          f"load {res['load_avg_1min_before']:.2f} -> {res['load_avg_1min_after']:.2f}")
    print(f"  {'stage':<20} {'seconds':>8} {'share':>6} {'floor s':>8}")
    for k, v in res["stages_s"].items():
        f = fl.get(k)
        print(f"  {k:<20} {v:8.3f} {v / res['total_s']:6.1%} {'' if f is None else f'{f:8.3f}'}")
    for op in res["ops"] or []:
        print(f"    {op['op']:<44} {op['self_s']:8.3f} s  {op['calls']:5d} calls")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--contraction", default="materialise", choices=["auto", "materialise", "pairs"])
    ap.add_argument("--reps", type=int, default=3, help="timed calls; the fastest one's stages are kept")
    ap.add_argument("--profile", type=int, default=12, help="torch.profiler: this many ops (0: none)")
    ap.add_argument("--trees", nargs="+", help="source trees to compare, each in its own subprocess")
    ap.add_argument("--rounds", type=int, default=1, help="with --trees: alternations of the trees")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: process CPU time for every timing and mm rate (with --threads 1, the time this "
                         "process ran, robust to other processes on the cores)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a)))
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import bf16_unit, cpu_name

    out = {"cpu": cpu_name(), "bf16_unit": bf16_unit(), "uptime": _uptime(), "runs": []}
    print(f"{out['cpu']}, bf16 unit {out['bf16_unit']}; {out['uptime']}")
    if not a.trees:
        res = _child(a)
        _print(res)
        out["runs"].append(res)
    else:
        args = ["--model", a.model, "--n", str(a.n), "--dtype", a.dtype, "--contraction", a.contraction,
                "--reps", str(a.reps), "--profile", str(a.profile)]
        args += (["--threads", str(a.threads)] if a.threads else []) + ["--clock", a.clock]
        for r in range(a.rounds):
            for tree in a.trees:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
                p = subprocess.run([sys.executable, os.path.abspath(__file__), *args, "--child"], env=env,
                                   capture_output=True, text=True, check=True)
                res = json.loads(p.stdout.strip().splitlines()[-1])
                res.update(tree=tree, round=r)
                _print(res, f"[round {r}, {tree}] ")
                out["runs"].append(res)
    out["uptime_after"] = _uptime()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def _uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    return f"load average {os.getloadavg()}"


if __name__ == "__main__":
    sys.exit(main())
