"""Helpers shared by the benchmark files."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so a timing covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, reps: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()``: CUDA events around each call on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bytes_per_second(device: torch.device, nbytes: int) -> float:
    """The memory-bound ceiling: a device-to-device copy of ``nbytes`` float32, counted as
    bytes read plus bytes written, median of the timed repeats."""
    n = nbytes // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    seconds = median_seconds(lambda: dst.copy_(src), device)
    return 2 * n * 4 / seconds


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_unit() -> str:
    """This CPU's bfloat16 matrix unit: "AMX", "AVX-512 BF16" or "none" (without one, bfloat16
    products are emulated and no faster than float32; see `entk ext status`)."""
    from engine.ntk.contract import bf16_unit_name

    return bf16_unit_name()
