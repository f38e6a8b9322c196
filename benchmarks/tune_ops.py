"""Launch-configuration sweep for the Triton ops (the ``--tune`` mode of benchmarks/device_check.sh).

The configurations in engine/ops/triton/*.py were chosen by sweeps on an H200; this re-runs
those sweeps around the current choices and prints one line per configuration, best first per
case, with the fraction of the measured ceiling (copy bandwidth for kernel 1, torch.mm at
the same dtype for kernel 2). Every configuration's result is checked against the torch
reference before it is timed, so a fast wrong configuration cannot win.

Cases: kernel 1 at T = 16, M = 8192 (bfloat16 and float32, symmetric and full); kernel 2
float32 (tf32x3) 4096² × 8192 and bfloat16 8192³; kernel_gram end to end (M = 8192, 8191).
24 configurations per kernel-1 case (12 compiles), 7 per dtype for kernel 2: about 3 min
on an H200, compiles dominating (an estimate: not yet run there).

Run from the repository root:  bash benchmarks/device_check.sh --tune
(or PYTHONPATH=. python3 benchmarks/tune_ops.py [--out FILE]).
``--dry-run`` runs every code path on the CPU (Triton interpreter, tiny shapes, no timing
worth reading) so the script is known to work before device time is spent on it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dry-run", action="store_true", help="CPU interpreter, tiny shapes")
parser.add_argument("--out", type=Path, help="also write the results as JSON lines here")
args = parser.parse_args()
if args.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from _common import copy_bytes_per_second, median_seconds  # noqa: E402

import engine.ops.triton.gram_tile as gt  # noqa: E402
import engine.ops.triton.kernel_pairs as kp  # noqa: E402
from engine.ops.kernel_pairs import kernel_pairs_reference  # noqa: E402

dev = torch.device("cpu" if args.dry_run else "cuda")
T, M = (3, 40) if args.dry_run else (16, 8192)
R, P = (48, 40) if args.dry_run else (4096, 8192)
rows: list[dict] = []


def emit(row: dict) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def med(fn) -> float:
    return median_seconds(fn, dev, reps=2 if args.dry_run else 10, warmup=1)


if args.dry_run:
    copy_bps = 1.0
else:
    copy_bps = copy_bytes_per_second(dev, 4 << 30)
print(f"{torch.cuda.get_device_name() if not args.dry_run else 'cpu (dry run)'}, copy {copy_bps / 1e12:.2f} TB/s",
      flush=True)

# Kernel 1: BLOCK_N × num_warps × num_stages × programs per SM, around the current choice.
original_config, original_per_sm = kp._config, kp.MAX_PROGRAMS_PER_SM
for dtype, sym in itertools.product((torch.bfloat16, torch.float32), (True, False)):
    x = torch.randn(T, M, M, device=dev)
    x = ((x + x.transpose(1, 2)) / 2).to(dtype).contiguous()
    ref = kernel_pairs_reference(x, symmetric=sym)
    nbytes = T * (M * (M + 1) // 2 if sym else M * M) * x.element_size()
    sweep = itertools.product((128, 256, 512), (4, 8), (3, 4), (4, 8))
    if args.dry_run:
        sweep = [(16, 4, 2, 2), (32, 4, 3, 4)]
    results = []
    for block_n, warps, stages, per_sm in sweep:
        kp._config = lambda *a, b=block_n, w=warps, s=stages: (b, w, s)
        kp.MAX_PROGRAMS_PER_SM = per_sm
        case = dict(op="kernel_pairs", dtype=str(dtype)[6:], symmetric=sym, T=T, M=M, BLOCK_N=block_n,
                    num_warps=warps, num_stages=stages, programs_per_sm=per_sm)
        try:
            g = kp.kernel_pairs_triton(x, symmetric=sym, diag_offset=0)
            err = float((g - ref).norm() / ref.norm())
            if not err < 1e-4:
                raise ValueError(f"relative error {err:.2e}")
            s = med(lambda x=x, sym=sym: kp.kernel_pairs_triton(x, symmetric=sym, diag_offset=0))
        except Exception as e:  # out of shared memory, registers, a wrong result: report, go on
            emit({**case, "failed": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        results.append({**case, "ms": s * 1e3, "TBps": nbytes / s / 1e12, "of_copy": nbytes / s / copy_bps,
                        "relerr": err})
    kp._config, kp.MAX_PROGRAMS_PER_SM = original_config, original_per_sm
    for r in sorted(results, key=lambda r: r["ms"])[:8]:
        emit(r)
    del x, ref

# Kernel 2: float32 as tf32x3 (4096² × 8192) and bfloat16 (8192² × 8192, 82% of torch.mm
# in the last sweep, target 85%): tile shapes around the current candidates.
KERNEL2 = {
    torch.float32: [(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 256, 32, 8, 3), (128, 128, 64, 8, 2),
                    (128, 64, 32, 4, 3), (64, 128, 32, 4, 4), (256, 128, 32, 8, 3)],
    torch.bfloat16: [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                     (128, 128, 64, 4, 4), (128, 256, 128, 8, 2), (64, 256, 64, 4, 4)],
}
original_gt = gt._config
for dtype, sweep in KERNEL2.items():
    r_ = R if dtype == torch.float32 or args.dry_run else 8192
    a = torch.randn(r_, P, device=dev).to(dtype)
    b = torch.randn(r_, P, device=dev).to(dtype)
    ref = a.double() @ b.double().T
    mm_s = med(lambda a=a, b=b: a @ b.T)
    flops = 2 * r_ * r_ * P
    if args.dry_run:
        sweep = [(16, 16, 16, 4, 2)]
    results = []
    for cfg in sweep:
        gt._config = lambda *a_, c=cfg: c
        name = "float32-tf32x3" if dtype == torch.float32 else "bfloat16"
        case = dict(op="gram_tile", dtype=name, R=r_, P=P, tile=list(cfg))
        try:
            out, _ = gt.gram_tile_triton(a, b, want="full", num_outputs=1, out=None, traced=None,
                                         accumulate=False, upper=False)
            err = float((out.double() - ref).norm() / ref.norm())
            if not err < 1e-4:  # bfloat16's truncating accumulator: ~1e-5 at P = 8192
                raise ValueError(f"relative error {err:.2e}")
            s = med(lambda a=a, b=b, out=out: gt.gram_tile_triton(a, b, want="full", num_outputs=1, out=out,
                                                                  traced=None, accumulate=False, upper=False))
        except Exception as e:
            emit({**case, "failed": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        results.append({**case, "ms": s * 1e3, "TFLOPs": flops / s / 1e12, "of_torch_mm": mm_s / s,
                        "relerr": err})
    gt._config = original_gt
    for r in sorted(results, key=lambda r: r["ms"]):
        emit(r)
    del a, b, ref

# kernel_gram end to end on device-resident kernels: M a multiple of 16 or not (the staged
# tiles' alignment), symmetric, auto backend.
from engine.ntk import kernel_gram  # noqa: E402

for m in ((40, 37) if args.dry_run else (8192, 8191)):
    ks = [torch.randn(m, m, device=dev) for _ in range(T)]
    ks = [(k + k.T) / 2 for k in ks]
    for backend in ("auto", "triton", "ext"):
        case = dict(op="kernel_gram", dtype="float32", symmetric=True, T=T, M=m, backend=backend)
        try:
            s = med(lambda ks=ks, backend=backend: kernel_gram(ks, symmetric=True, device=dev, backend=backend))
        except Exception as e:
            emit({**case, "failed": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        nbytes = T * m * (m + 1) // 2 * 4
        emit({**case, "ms": s * 1e3, "TBps": nbytes / s / 1e12, "of_copy": nbytes / s / copy_bps})
    del ks
print(f"done: {len(rows)} lines in {time.process_time():.0f} s CPU", flush=True)
