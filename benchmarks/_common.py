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


def bench_calls(benchmark, fn, device: torch.device, role: str, unit: str, items, *, rounds: int, **info) -> None:
    """Time ``fn`` (one call = one round, after one warm-up round) and record what the ratio table
    at the end needs: the member's ``role`` ("reference", "engine" or "peer"), the ``unit`` and how
    many of it one call makes (``items``). The caller has already run ``fn`` once to check it."""

    def call():
        fn()
        sync(device)

    benchmark.extra_info.update(role=role, unit=unit, items_per_call=items, device=str(device), **info)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)


def fresh_model(name: str, device: torch.device, num_classes: int = 10) -> torch.nn.Module:
    """``build_model(name)`` freshly initialised from seed 0, in eval mode (BatchNorm on its initial
    running statistics), so that every member of a group sees the same network."""
    from engine.models import build_model

    torch.manual_seed(0)
    return build_model(name, num_classes=num_classes).to(device).eval()


def nngeometry_version() -> str:
    """The installed nngeometry's version, for skip messages when the peer tool fails."""
    import importlib.metadata

    try:
        return importlib.metadata.version("nngeometry")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"
