"""Short device check of the all-pairs kernel (kernel 1): CUDA extension vs Triton vs the torch
reference, T=16, M=8192, with the copy ceiling measured in the same process. Prints one line per case.
Run from the repo root: PYTHONPATH=. python3 benchmarks/gpu_kernel_pairs_quick.py"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import copy_bytes_per_second, median_seconds

from engine.ops import ext, kernel_pair_products


def med(fn):
    return median_seconds(fn, dev)


dev = torch.device("cuda")
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
t0 = time.perf_counter()
try:
    ext.load(dev)
    print(f"cuda ext ready in {time.perf_counter() - t0:.1f} s", flush=True)
except Exception as e:
    print("CUDA EXT FAILED:", e, flush=True)
copy = copy_bytes_per_second(dev, 4 << 30) / 1e12
print(f"copy ceiling {copy:.2f} TB/s (read+write)", flush=True)
T, M = 16, 8192
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(T, M, M, device=dev)
    x = ((x + x.transpose(1, 2)) / 2).to(dtype).contiguous()
    ref = kernel_pair_products(x, symmetric=True, backend="torch")
    for backend in ("ext", "triton", "torch"):
        for sym in (True, False):
            try:
                g = kernel_pair_products(x, symmetric=sym, backend=backend)
                err = float((g - ref).norm() / ref.norm())
                s = med(lambda b=backend, s_=sym, x_=x: kernel_pair_products(x_, symmetric=s_, backend=b))
            except Exception as e:
                print(f"{backend} {dtype} sym={sym}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            nbytes = T * (M * (M + 1) // 2 if sym else M * M) * x.element_size()
            tbs = nbytes / s / 1e12
            print(f"kp {backend:6s} {str(dtype)[6:]:8s} T={T} M={M} sym={sym!s:5s} {s * 1e3:8.3f} ms "
                  f"{tbs:5.2f} TB/s read = {tbs / copy:5.1%} of copy  relerr {err:.1e}", flush=True)
    x = ref = None
sys.exit(0)
