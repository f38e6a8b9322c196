"""Error of entk(compute_dtype=bfloat16) against float64 on real trained checkpoints.

For every checkpoint of a run file: the float32 and bfloat16 full eNTK on a seeded,
class-balanced probe set of real test images, each against the float64 eNTK of the
same checkpoint (model and inputs in float64, structured engine), as relative Frobenius
errors; then the pairwise kernel distances S between checkpoints from each precision
and their largest absolute deviation from the float64 distances.

Run: python benchmarks/ntk_bf16_error.py RUN.h5 --probe 100 --data-root ARCHIVE [--json OUT]
(the run: ``entk train --model cnn --data cifar10 --n-train 5000 --steps 300
--checkpoints 0,30,100,300``).
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

from engine.data import load_dataset
from engine.jobs import probe_set
from engine.models import build_model
from engine.ntk import entk, pairwise_kernel_distance
from engine.store import RunFile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--probe", type=int, default=100)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--json")
    a = ap.parse_args()
    run = RunFile(a.run)
    cfg = run.config
    ds = load_dataset("cifar10", a.data_root)
    x, _ = probe_set(ds, a.probe)
    rows, ks = [], {"float64": [], "float32": [], "bfloat16": []}
    for it in run.completed_iterations():
        model = run.load_into(build_model(cfg["model"]), iteration=it).eval()
        h64 = entk(copy.deepcopy(model).double(), x.double())
        h32 = entk(model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hb = entk(model, x, compute_dtype=torch.bfloat16)

        def rel(h, h64=h64):
            return float((h.double() - h64).norm() / h64.norm())

        rows.append({"iteration": it, "rel_err_float32": rel(h32), "rel_err_bfloat16": rel(hb)})
        print(rows[-1], flush=True)
        for k, h in (("float64", h64), ("float32", h32), ("bfloat16", hb)):
            ks[k].append(h.double())
    s = {k: pairwise_kernel_distance(v) for k, v in ks.items()}
    out = {"run": a.run, "model": cfg["model"], "probe": a.probe, "checkpoints": rows,
           "distance_float64": s["float64"].tolist(),
           "distance_abs_err_float32": float((s["float32"] - s["float64"]).abs().max()),
           "distance_abs_err_bfloat16": float((s["bfloat16"] - s["float64"]).abs().max()),
           "distance_rel_err_bfloat16": float(((s["bfloat16"] - s["float64"]).abs()
                                               / s["float64"].abs().clamp_min(1e-300)).fill_diagonal_(0).max())}
    print(json.dumps({k: v for k, v in out.items() if k != "checkpoints"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
