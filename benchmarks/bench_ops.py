"""Fused ops against the torch reference and the device's measured ceilings, in one run.

Ceilings (measured first, in this same process, on the same device; ``ceilings`` group):
  * copy: a large device-to-device copy (CPU: 512 MB, CUDA: 4 GB), GB/s counting bytes
    read plus bytes written (METHOD: the memory-bound roofline);
  * mm: ``torch.mm`` of square matrices (CPU: 2048, CUDA: 8192) in float32 and bfloat16,
    TFLOP/s at 2·n³ FLOPs, random inputs.

Groups (a reference member each; the printed table gives ratios, GB/s or TFLOP/s, and the
fraction of the ceiling):
  * ``kernel-pairs-<dtype>-T16-M<M>`` (kernel 1; CPU M=2048, CUDA M=8192): T=16 random
    symmetric kernels stacked (T, M, M); members ``kernel_pair_products(symmetric=True)``
    with backends ``torch`` (float64 reference, role reference), ``ext`` (C++ or CUDA),
    ``triton`` (CUDA only; float32 as two-pass tf32x3, ``triton-tf32x3-triton`` as Triton's
    three-pass, ``triton-ieee`` as CUDA-core FMAs), ``ext`` and
    ``triton`` with ``symmetric=False`` (``-full``: reads everything), and a
    naive float32 loop over the 136 pairs (``torch.dot``; role peer: what one would write).
    Bytes = what the op must read once: T·M(M+1)/2 elements symmetric, T·M² otherwise.
    **Targets: CPU ext ≥ 2x the reference; H200 ≥ 80% of copy bandwidth.**
  * ``gram-tile-<dtype>`` (kernel 2; CUDA only: on the CPU Triton runs in its interpreter):
    Jacobian blocks a, b of R × P (bf16: 8192 × 8192; fp32: 4096 × 8192), out float32 R × R.
    Members: ``torch.mm(a, b.T)`` (role reference: cuBLAS, output in the input dtype),
    torch.mm plus a separate ``out +=`` epilogue (the unfused path), ``gram_tile`` full
    with accumulate (float32: the default tf32x3 dot; ``gram_tile-ieee``: CUDA-core FMAs),
    ``gram_tile`` on a diagonal tile (``upper=True``: FLOPs counted as the full tile's, so
    its rate shows the saving), and ``want="both"`` with C = 10.
    FLOPs = 2·R·R·P. **Target: ≥ 85% of torch.mm at the same precision.**

Run: .venv/bin/python -m pytest benchmarks/bench_ops.py -p no:cacheprovider \\
     --benchmark-json=benchmarks/results/ops-<hw>.json
"""

from __future__ import annotations

import pytest
import torch
from _common import copy_bytes_per_second, median_seconds, sync

from engine.ops import BackendUnavailableError, gram_tile, kernel_pair_products
from engine.ops import ext as ops_ext
from engine.ops.backend import triton_unavailable_reason

T = 16


@pytest.fixture(scope="module")
def ceilings(device):
    """Measured ceilings: copy GB/s (read + write) and torch.mm TFLOP/s per dtype."""
    cuda = device.type == "cuda"
    out = {"copy_GBps": copy_bytes_per_second(device, 4 << 30 if cuda else 512 << 20) / 1e9}
    n = 8192 if cuda else 2048
    for dt in (torch.float32, torch.bfloat16):
        if not cuda and dt == torch.bfloat16:
            continue
        ab = [torch.randn(n, n, device=device, dtype=dt) for _ in range(2)]
        seconds = median_seconds(lambda ab=ab: ab[0] @ ab[1], device)
        out[f"mm_TFLOPs_{str(dt).removeprefix('torch.')}"] = 2 * n**3 / seconds / 1e12
    print(f"\nceilings on {device}: " + ", ".join(f"{k}={v:.1f}" for k, v in out.items()))
    return out


def _symmetric_kernels(m: int, dtype, device) -> torch.Tensor:
    x = torch.randn(T, m, m, device=device)
    return ((x + x.transpose(1, 2)) / 2).to(dtype).contiguous()


def _kp_members(device, dtype):
    members = ["torch", "ext", "ext-full", "naive-pairs"]
    if device.type == "cuda":
        members += ["triton", "triton-full"] + (["triton-ieee", "triton-tf32x3-triton"]
                                                if dtype == torch.float32 else [])
    return members


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("member", ["torch", "ext", "triton", "triton-ieee", "triton-tf32x3-triton", "ext-full",
                                    "triton-full", "naive-pairs"])
def test_kernel_pairs(benchmark, device, ceilings, member, dtype):
    if member not in _kp_members(device, dtype):
        pytest.skip("Triton on the CPU runs in its interpreter: not a performance path; "
                    "triton-ieee is the float32 FMA form")
    m = 8192 if device.type == "cuda" else 2048
    x = _symmetric_kernels(m, dtype, device)
    itemsize = x.element_size()
    sym = not member.endswith("-full")
    elements = T * (m * (m + 1) // 2 if sym else m * m)
    if member == "naive-pairs":
        flat = x.reshape(T, -1)

        def fn():
            g = torch.empty(T, T, device=device, dtype=torch.float64)
            for i in range(T):
                for j in range(i, T):
                    g[i, j] = g[j, i] = torch.dot(flat[i], flat[j]).double()
            return g
        elements = T * (T + 1) * m * m  # two kernels read per pair
    elif member in ("triton-ieee", "triton-tf32x3-triton"):
        from engine.ops.triton.kernel_pairs import kernel_pairs_triton

        form = member.removeprefix("triton-")

        def fn():
            return kernel_pairs_triton(x, symmetric=sym, diag_offset=0, fp32_dot=form)
    else:
        backend = member.removesuffix("-full")
        try:
            kernel_pair_products(x[:, :7, :7], backend=backend)
        except BackendUnavailableError as e:
            pytest.skip(str(e))

        def fn():
            return kernel_pair_products(x, symmetric=sym, backend=backend)

    def run():
        r = fn()
        sync(device)
        return r

    benchmark.group = f"kernel-pairs-{str(dtype).removeprefix('torch.')}-T{T}-M{m}"
    benchmark.extra_info.update(
        role={"torch": "reference", "naive-pairs": "peer"}.get(member, "fast"),
        bytes=elements * itemsize, ceiling_GBps=ceilings["copy_GBps"], unit="GB",
        items_per_call=elements * itemsize / 1e9)
    benchmark.pedantic(run, rounds=10 if device.type == "cuda" else 3, warmup_rounds=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("member", ["torch.mm", "torch.mm+epilogue", "gram_tile", "gram_tile-ieee",
                                    "gram_tile-upper", "gram_tile-both-C10"])
def test_gram_tile(benchmark, device, ceilings, member, dtype):
    if device.type != "cuda" or triton_unavailable_reason(device) is not None:
        pytest.skip("gram_tile's fast path is Triton on CUDA; on the CPU it runs in the interpreter")
    if member == "gram_tile-ieee" and dtype != torch.float32:
        pytest.skip("the ieee/tf32x3 choice is float32's")
    from engine.ops.triton.gram_tile import gram_tile_triton
    r, p = (8192, 8192) if dtype == torch.bfloat16 else (4096, 8192)
    a = torch.randn(r, p, device=device, dtype=dtype)
    b = torch.randn(r, p, device=device, dtype=dtype)
    out = torch.randn(r, r, device=device)
    traced = torch.randn(r // 10, r // 10, device=device)
    fns = {
        "torch.mm": lambda: a @ b.T,
        "torch.mm+epilogue": lambda: out.add_(a @ b.T),
        "gram_tile": lambda: gram_tile(a, b, out=out, accumulate=True, backend="triton"),
        "gram_tile-ieee": lambda: gram_tile_triton(a, b, want="full", num_outputs=1, out=out, traced=None,
                                                   accumulate=True, upper=False, fp32_dot="ieee"),
        "gram_tile-upper": lambda: gram_tile(a, a, out=out, accumulate=True, upper=True, backend="triton"),
        "gram_tile-both-C10": lambda: gram_tile(a, b, want="both", num_outputs=10, out=out, traced=traced,
                                                accumulate=True, backend="triton"),
    }
    fn = fns[member]

    def run():
        fn()
        sync(device)

    name = str(dtype).removeprefix("torch.")
    benchmark.group = f"gram-tile-{name}-R{r}-P{p}"
    benchmark.extra_info.update(role="reference" if member == "torch.mm" else "fast", flops=2 * r * r * p,
                                ceiling_TFLOPs=ceilings[f"mm_TFLOPs_{name}"], unit="TFLOP",
                                items_per_call=2 * r * r * p / 1e12)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)


def test_ext_status_is_reported(device):
    """Not a timing: records whether the extension built here (the table would be misleading otherwise)."""
    ok = ops_ext.available(device)
    print(f"\next backend on {device}: {'available' if ok else 'UNAVAILABLE'}")
