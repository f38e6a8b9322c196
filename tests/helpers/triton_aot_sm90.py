"""Compile every Triton kernel configuration the launchers use, for sm_90, without a GPU.

Run in its own process (TRITON_INTERPRET must be off when the kernels are defined). The
launchers are called on CPU tensors with the kernels replaced by recorders, so the
configurations are exactly those the launch code picks; each distinct one is compiled for
an H100/H200 target and its shared memory and instructions are reported as JSON lines.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import engine.ops.triton.gram_tile as gt
import engine.ops.triton.kernel_pairs as kp

TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
calls: dict[str, tuple] = {}


class Recorder:
    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(inspect.signature(self.kernel.fn).parameters)
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            sig = {}
            for n, a in zip(names, args, strict=False):
                if isinstance(a, torch.Tensor):
                    sig[n] = TYPES[a.dtype]
                else:
                    sig[n] = "i64" if abs(int(a)) >= 2**31 else "i32"
            for n in kwargs:
                sig[n] = "constexpr"
            key = json.dumps([self.name, sig, kwargs, options], sort_keys=True, default=str)
            calls[key] = (self.kernel, sig, dict(kwargs), options, names)
        return launch


kp._kernel_pairs_kernel = Recorder("kernel_pairs", kp._kernel_pairs_kernel)
gt._gram_tile_kernel = Recorder("gram_tile", gt._gram_tile_kernel)

for dtype in (torch.float32, torch.bfloat16):
    for t in (3, 16, 17, 64, 70):
        for sym in (False, True):
            kp.kernel_pairs_triton(torch.zeros(t, 40, 300, dtype=dtype), symmetric=sym, diag_offset=0)
            if dtype == torch.float32 and t == 16:  # the alternative float32 dots the benchmarks compare
                for form in ("ieee", "tf32x3-triton"):
                    kp.kernel_pairs_triton(torch.zeros(t, 40, 300, dtype=dtype), symmetric=sym, diag_offset=0,
                                           fp32_dot=form)
    for want in ("full", "traced", "both"):
        for upper in (False, True):
            a = torch.zeros(60, 64, dtype=dtype)
            gt.gram_tile_triton(a, a, want=want, num_outputs=3, out=None, traced=None, accumulate=True,
                                upper=upper)
    if dtype == torch.float32:
        a = torch.zeros(60, 64, dtype=dtype)
        gt.gram_tile_triton(a, a, want="full", num_outputs=1, out=None, traced=None, accumulate=False,
                            upper=False, fp32_dot="ieee")

target = GPUTarget("cuda", 90, 32)
for kernel, sig, constexprs, options, names in calls.values():
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=target, options=options)
    ptx = compiled.asm["ptx"]
    print(json.dumps({"kernel": kernel.fn.__name__, "triton": triton.__version__,
                      "constexprs": constexprs, "options": options,
                      "dtype": sig[names[0]], "shared": compiled.metadata.shared,
                      "wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx or "wgmma" in ptx,
                      "tf32_mma": bool(re.search(r"mma[^\n]*tf32", ptx)),
                      "ptx_lines": ptx.count("\n")}), flush=True)
sys.exit(0)
