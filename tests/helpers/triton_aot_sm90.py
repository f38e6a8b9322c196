"""Compile every Triton kernel configuration the launchers use, for sm_90, without a GPU.

Run in its own process (TRITON_INTERPRET must be off when the kernels are defined). The
launchers are called on CPU tensors with the kernels replaced by recorders, so the
configurations are exactly those the launch code picks, and each call is specialised by
Triton's own runtime binder (the arguments equal to 1 become constants, integers and
pointers divisible by 16 are marked so, as on a real launch: that decides whether loads
are vectorised). Each distinct configuration is compiled for an H100/H200 target; its
shared memory, instructions and ptxas register/spill report are printed as JSON lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

import engine.ops.triton.gram_tile as gt
import engine.ops.triton.kernel_pairs as kp

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
calls: dict[str, tuple] = {}


class Recorder:
    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel
        self.binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound, specialization, options = self.binder(*args, **kwargs)
            options, signature, constexprs, attrs = self.kernel._pack_args(BACKEND, kwargs, bound, specialization,
                                                                           options)
            key = json.dumps([self.name, str(specialization), str(options)])
            named = {self.kernel.arg_names[path[0]]: v for path, v in constexprs.items()
                     if len(path) == 1 and signature[self.kernel.arg_names[path[0]]] == "constexpr"
                     and self.kernel.arg_names[path[0]] in kwargs}
            calls[key] = (self.kernel, signature, constexprs, attrs, options, named)
        return launch


kp._kernel_pairs_kernel = Recorder("kernel_pairs", kp._kernel_pairs_kernel)
gt._gram_tile_kernel = Recorder("gram_tile", gt._gram_tile_kernel)

# Row lengths a multiple of 16, as engine.ntk stages them (kernel_gram) or pads them (gram),
# and outputs with 16-element rows (96 samples × C = 3): an unaligned output row stride makes
# every store scalar, and the epilogue then needs a 64-bit address per element.
for dtype in (torch.float32, torch.bfloat16):
    for t in (3, 16, 17, 64, 70):
        for sym in (False, True):
            kp.kernel_pairs_triton(torch.zeros(t, 40, 320, dtype=dtype), symmetric=sym, diag_offset=0)
            if dtype == torch.float32 and t == 16:  # the alternative float32 dots the benchmarks compare
                for form in ("ieee", "tf32x3-triton"):
                    kp.kernel_pairs_triton(torch.zeros(t, 40, 320, dtype=dtype), symmetric=sym, diag_offset=0,
                                           fp32_dot=form)
    # The small segments the CUDA-marked tests force (tests/test_ops_triton_kernel_pairs.py).
    real_config = kp._config
    kp._config = lambda *args: (16, 4, 2)
    for t in (3, 9):
        for sym in (False, True):
            kp.kernel_pairs_triton(torch.zeros(t, 40, 96, dtype=dtype), symmetric=sym, diag_offset=1)
    kp._config = real_config
    for want in ("full", "traced", "both"):
        for upper in (False, True):
            a = torch.zeros(96, 128, dtype=dtype)
            gt.gram_tile_triton(a, a, want=want, num_outputs=3, out=None, traced=None, accumulate=True,
                                upper=upper)
    a = torch.zeros(96, 128, dtype=dtype)
    for want in ("full", "traced"):  # writing rather than adding: no prior tile beside the accumulator
        gt.gram_tile_triton(a, a, want=want, num_outputs=3, out=None, traced=None, accumulate=False, upper=False)
    if dtype == torch.float32:
        gt.gram_tile_triton(a, a, want="full", num_outputs=1, out=None, traced=None, accumulate=False,
                            upper=False, fp32_dot="ieee")


def ptxas_report(ptx: str, arch: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from ptxas -v on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(PTXAS), f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return max(map(int, regs)), max(map(int, spills or ["0"]))


for kernel, signature, constexprs, attrs, options, named in calls.values():
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    regs, spills = ptxas_report(ptx, arch)
    print(json.dumps({"kernel": kernel.fn.__name__, "triton": triton.__version__,
                      "constexprs": {k: v for k, v in named.items()},
                      "options": {"num_warps": options.num_warps, "num_stages": options.num_stages},
                      "dtype": signature[kernel.arg_names[0]], "shared": compiled.metadata.shared,
                      "wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx or "wgmma" in ptx,
                      "tf32_mma": bool(re.search(r"mma[^\n]*tf32", ptx)),
                      "regs": regs, "spill_bytes": spills}), flush=True)
sys.exit(0)
