"""`entk ext`: build or inspect the compiled csrc/ extension (fused ops)."""

from __future__ import annotations

import argparse
import time

import torch

from .. import heap, wait_policy
from ..ntk.contract import bf16_unit_name
from ..ops import BackendUnavailableError
from ..ops import ext as ops_ext
from ..ops.backend import triton_unavailable_reason
from .options import add_device, add_json, check_outputs, write_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ext", help="build or inspect the compiled csrc/ extension (fused ops)",
                       description="Build the C++ (and, with a GPU, CUDA) extension ahead of time, or report "
                                   "which backends of the fused ops can run here. It is built only here or by an "
                                   "explicit backend='ext' (backend='auto' never compiles: it uses the "
                                   "extension once built for this torch installation); ENTK_EXT=0 disables "
                                   "it, ENTK_EXT_DIR moves its build cache.")
    p.add_argument("action", choices=["build", "status"], help="build: compile now; status: report only")
    add_device(p, "auto (CPU, and CUDA if available), cpu, cuda", choices=["auto", "cpu", "cuda"])
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    add_json(p, "also write a JSON summary: per device, the extension's state, Triton's availability "
                "and (CPU) the bfloat16 matrix unit")
    p.set_defaults(handler=run)
    return p


def _bf16_line(unit: str) -> str:
    if unit == "none":
        # Said here so that a bfloat16 run's missing speed-up is read as the CPU's, not the engine's.
        return ("none (no AVX-512 BF16 or AMX: AVX2-only): compute_dtype=bfloat16 is emulated in float32, "
                "with bfloat16's error and no speed-up")
    return f"{unit}: compute_dtype=bfloat16 multiplies in bfloat16 with float32 accumulation"


def run(args) -> int:
    check_outputs(files=[("--json", args.json)])
    kinds = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if args.device == "auto" and not torch.cuda.is_available():
        kinds = ["cpu"]
    failed = False
    report = {}
    for kind in kinds:
        dev = torch.device(kind)
        built = ops_ext.built_path(kind)
        rec = {"built": str(built) if built else None}
        if args.action == "status":
            why = ops_ext.unavailable_reason(kind) or "buildable here"
            rec["status"] = why
            print(f"ext ({kind}): " + (f"built: {built}" if built else f"not built yet (entk ext build; {why})"))
        else:
            try:
                t0 = time.perf_counter()
                mod = ops_ext.load(dev, verbose=args.verbose)
                dt = time.perf_counter() - t0
                rec.update(built=mod.__file__, status="ready", seconds=round(dt, 3))
                print(f"ext ({kind}): ready in {dt:.1f} s: {mod.__file__}")
            except BackendUnavailableError as e:
                failed = True
                rec["status"] = str(e)
                print(f"ext ({kind}): {e}")
        why = triton_unavailable_reason(dev)
        if dev.type == "cuda" and not torch.cuda.is_available():
            why = "CUDA is not available"  # the Triton package may be installed, but it has no device here
        rec["triton"] = "available" if why is None else why
        print(f"triton ({kind}): {rec['triton']}")
        if dev.type == "cpu":
            rec["bf16_matmul"] = unit = bf16_unit_name()
            print(f"bf16 matmul (cpu): {_bf16_line(unit)}")
        report[kind] = rec
    # Said because a shared machine's slowdown depends on it (engine/wait_policy.py).
    print(f"OpenMP wait policy: {wait_policy.describe()}")
    # And the heap's: page faults are a large share of a CPU call on some machines (engine/heap.py).
    print(f"heap policy: {heap.describe()}")
    if args.json:
        write_json(args.json, "ext", {"action": args.action, "devices": report,
                                      "omp_wait_policy": wait_policy.describe(), "heap_policy": heap.describe()})
    return 1 if failed and args.action == "build" else 0
