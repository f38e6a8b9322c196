"""The largest N whose full eNTK of cnn each tool computes within a memory limit (default 24 GB).

    .venv/bin/python benchmarks/largest_n.py --json benchmarks/results/largest-n-cpu.json

Members, each in a fresh process per N on N real CIFAR-10 training images (seeded, class-balanced):

- ``recipe``: the PyTorch tutorial's ``empirical_ntk_jacobian_contraction`` (benchmarks/bench_ntk_entk.py),
  which holds both Jacobians and every parameter's (N, N, C, C) contraction at once;
- ``nngeometry``: ``GramMatrix`` (nngeometry 0.4), the peer;
- ``entk``: this engine's in-memory ``engine.entk`` (H in RAM, Jacobian blocks within its budget);
- the out-of-core ``entk kernel`` job needs no RAM for H: its size is bounded by disk, and its run at
  N = 5000 within ``--memory-gb 2`` is ``benchmarks/kernel_job_scaling.py``.

Each child runs under ``RLIMIT_AS`` = the limit, so a member that does not fit fails with an
allocation error instead of waking the kernel's OOM killer. Peak RSS (``ru_maxrss``) is measured
at a ladder of small N; a quadratic a + b·N + c·N² through them predicts the N at which the peak
reaches the limit (its N² term at least the 4·(C·N)² bytes of H). ``--verify`` then searches with
runs: from the prediction, up by 1.15x while they finish, else bisecting between the largest N
that finished and the smallest that failed until they are within 8%, so the reported largest N is
measured, not extrapolated; members whose run at the predicted N would take longer than
``--max-verify-s`` (predicted from the ladder's times, which grow as N²) are reported as predicted
only, with the time they would take.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark files import their helpers as _common

from benchmarks._common import cpu_name  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
GB = 10**9
MEMBERS = ("recipe", "nngeometry", "entk")
C = 10  # CIFAR-10 outputs
LADDERS = {"recipe": (128, 256, 512), "nngeometry": (32, 64, 128), "entk": (256, 512, 1024)}


# --------------------------------------------------------------------------- child: one member at one N


def _child(member: str, n: int, data_root: str) -> dict:
    import torch

    from benchmarks.bench_ntk_entk import _as_rows, _recipe
    from engine import build_model, entk, load_dataset
    from engine.data import normalize

    ds = load_dataset("cifar10", data_root, progress=False)
    sub = ds.subset(n_train=n, seed=0)
    x = normalize(sub.x_train, ds.mean, ds.std)
    del ds, sub
    torch.manual_seed(0)
    model = build_model("cnn").eval()
    t0 = time.perf_counter()
    if member == "recipe":
        h = _as_rows(_recipe(model)(x, x))
    elif member == "nngeometry":
        from nngeometry import GramMatrix

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(n)), batch_size=64)
        g = GramMatrix(model, loader, function=lambda xb, t: model(xb)).to_torch()
        h = g.permute(1, 0, 3, 2).reshape(n * g.shape[0], n * g.shape[0])
    else:
        h = entk(model, x)
    seconds = time.perf_counter() - t0
    return {"n": n, "ok": True, "seconds": seconds, "shape": list(h.shape),
            "finite": bool(torch.isfinite(h).all()), "peak_rss_gb": _peak_rss_gb()}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _run_child(member: str, n: int, data_root: str, limit: int, threads: int, timeout: float | None) -> dict:
    """One member at one N in a fresh process under RLIMIT_AS = ``limit``; the child reports its own peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        proc = subprocess.run([sys.executable, __file__, "--child", member, str(n), "--data-root", data_root],
                              env=env, capture_output=True, text=True, preexec_fn=limit_memory, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"n": n, "ok": False, "error": f"timed out after {timeout:.0f} s", "wall_seconds": timeout}
    rec = {"n": n, "wall_seconds": time.perf_counter() - t0}
    lines = proc.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        rec.update(json.loads(lines[-1]))
    else:
        tail = [s for s in proc.stderr.strip().splitlines() if s.strip()][-1:] or [f"exit {proc.returncode}"]
        rec.update({"ok": False, "error": tail[0][:300], "returncode": proc.returncode})
    return rec


# --------------------------------------------------------------------------- parent


def _fit(points: list[tuple[int, float]]):
    """Least-squares a + b·N + c·N² through (N, value) points (exact through three)."""
    import numpy as np

    n = np.array([p[0] for p in points], float)
    v = np.array([p[1] for p in points], float)
    a = np.stack([np.ones_like(n), n, n * n], 1)
    coef, *_ = np.linalg.lstsq(a, v, rcond=None)
    return [float(c) for c in coef]


def _solve(coef, target: float) -> float:
    a, b, c = coef
    if c <= 0:
        return (target - a) / b if b > 0 else math.inf
    return (-b + math.sqrt(b * b - 4 * c * (a - target))) / (2 * c)


def _search(member, ladder, n_pred, data_root, limit, threads, t_pred, steps: int = 5) -> dict:
    """Runs at N: from the prediction, up by 1.15x while they finish, else bisect (geometrically) between
    the largest N that finished and the smallest that failed, until they are within 8%."""
    lo, hi, runs = ladder[-1]["n"], None, []
    n = n_pred
    for _ in range(steps):
        rec = _run_child(member, n, data_root, limit, threads, 3 * t_pred + 600)
        runs.append(rec)
        ok = bool(rec.get("ok"))
        print(f"{member:<11} N={n:<6} {'finished' if ok else 'FAILED: ' + str(rec.get('error'))[:160]}"
              f"  ({rec['wall_seconds']:.0f} s)", flush=True)
        if ok:
            lo = max(lo, n)
        else:
            hi = n if hi is None else min(hi, n)
        if hi is not None and hi / lo <= 1.08:
            break
        n = int(n * 1.15) if hi is None else int(math.sqrt(lo * hi))
    return {"search": runs, "largest_finished_n": lo, "smallest_failed_n": hi}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("MEMBER", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--members", default=",".join(MEMBERS), help=f"comma-separated, of {', '.join(MEMBERS)}")
    ap.add_argument("--limit-gb", type=float, default=24.0, help="memory limit per process, GB (default 24)")
    ap.add_argument("--verify", action="store_true", help="run each member at its predicted largest N and 1.15x it")
    ap.add_argument("--max-verify-s", type=float, default=1200.0,
                    help="skip a verification predicted to take longer than this (default 1200 s)")
    ap.add_argument("--data-root", default=str(ARCHIVE), help="real CIFAR-10 (the JPEG archive)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    if args.child:
        try:
            print(json.dumps(_child(args.child[0], int(args.child[1]), args.data_root)))
        except (MemoryError, RuntimeError) as e:  # an allocation refused by RLIMIT_AS (torch raises RuntimeError)
            print(json.dumps({"n": int(args.child[1]), "ok": False, "error": f"{type(e).__name__}: {e}"[:300],
                              "peak_rss_gb": _peak_rss_gb()}))
            return 1
        return 0

    members = [m.strip() for m in args.members.split(",") if m.strip()]
    bad = [m for m in members if m not in MEMBERS]
    if bad:
        print(f"largest_n: --members: unknown {', '.join(bad)}; expected some of {', '.join(MEMBERS)}",
              file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).touch()
    limit = int(args.limit_gb * GB)
    threads = os.cpu_count() or 1
    results = []
    for member in members:
        ladder = []
        for n in LADDERS[member]:
            rec = _run_child(member, n, args.data_root, limit, threads, None)
            print(f"{member:<11} N={n:<6} {'ok' if rec.get('ok') else 'FAILED'}  {rec.get('seconds', 0):8.1f} s  "
                  f"peak RSS {rec['peak_rss_gb'] or float('nan'):6.2f} GB", flush=True)
            if not rec.get("ok"):
                raise SystemExit(f"{member} failed at N={n}: {rec.get('error')}")
            ladder.append(rec)
        coef = _fit([(r["n"], r["peak_rss_gb"] * GB) for r in ladder])
        # Every member holds H, 4·(C·N)² bytes: the N² term is at least that (the small rungs of a slow
        # member may not show it above the interpreter's resident memory).
        coef = [coef[0], max(coef[1], 0.0), max(coef[2], 4.0 * C * C)]
        n_pred = int(_solve(coef, limit))
        # Time grows as N² (the Gram) beyond the ladder: fit c·N² through the largest rung.
        t_pred = ladder[-1]["seconds"] * (n_pred / ladder[-1]["n"]) ** 2
        entry = {"member": member, "ladder": ladder, "peak_rss_fit_bytes": coef, "predicted_largest_n": n_pred,
                 "predicted_seconds_at_largest_n": t_pred}
        if args.verify:
            if t_pred > args.max_verify_s:
                entry["search"] = f"not run: predicted {t_pred / 60:.0f} min at N={n_pred} > --max-verify-s"
            else:
                entry.update(_search(member, ladder, n_pred, args.data_root, limit, threads, t_pred))
        results.append(entry)

    print(f"\nlargest N of the full cnn eNTK (P = 24,346, C = 10) within {args.limit_gb:g} GB per process:")
    print(f"{'member':<11} {'finished':>9} {'failed':>7} {'predicted':>10} {'H at predicted':>15} "
          f"{'time there':>11}")
    for e in results:
        n = e["predicted_largest_n"]
        fin, fail = e.get("largest_finished_n"), e.get("smallest_failed_n")
        print(f"{e['member']:<11} {fin or '-':>9} {fail or '-':>7} {n:>10,} {(C * n) ** 2 * 4 / GB:>12.1f} GB "
              f"{e['predicted_seconds_at_largest_n']:>9.0f} s")
    if args.json:
        import torch

        res = {"benchmark": "largest N of the full eNTK of cnn on real CIFAR-10 within a memory limit",
               "limit_gb": args.limit_gb, "members": results,
               "hardware": {"cpu": cpu_name(), "cores": threads,
                            "torch": torch.__version__, "memory_gb": os.sysconf("SC_PHYS_PAGES")
                            * os.sysconf("SC_PAGE_SIZE") / GB}}
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
