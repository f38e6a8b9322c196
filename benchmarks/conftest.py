"""Benchmark session helpers: device/hardware naming and a ratio table at the end.

Run: .venv/bin/python -m pytest benchmarks --benchmark-json=benchmarks/results/<hw>.json
Every group has a reference member (``extra_info["role"] == "reference"``); the table
printed at the end gives each member's speed relative to it.
"""

from __future__ import annotations

import pytest
import torch
from _common import cpu_name


def hardware_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {torch.get_num_threads()} threads (CPU)"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_addoption(parser):
    parser.addoption("--contended", action="store_true",
                     help="run one busy competing process during the benchmarks that support it "
                          "(bench_ntk_contraction.py), to measure the engine on shared cores")


def pytest_benchmark_update_machine_info(config, machine_info):
    from _common import bf16_unit

    machine_info["hardware"] = hardware_name()
    machine_info["torch"] = torch.__version__
    machine_info["bf16_unit"] = bf16_unit()
    machine_info["contended"] = bool(config.getoption("--contended"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    groups: dict[str, list] = {}
    for b in bs.benchmarks:
        if b.stats is None:
            continue
        groups.setdefault(b.group or "", []).append(b)
    tr = terminalreporter
    from _common import bf16_unit

    tr.write_sep("=", f"speed relative to the reference, {hardware_name()}, bf16 unit: {bf16_unit()}")
    for group, items in groups.items():
        ref = next((b for b in items if b.extra_info.get("role") == "reference"), None)
        tr.write_line(f"[{group}]")
        for b in items:
            med = b.stats.median
            ratio = f"{ref.stats.median / med:6.2f}x" if ref is not None else "   n/a"
            rate = b.extra_info.get("items_per_call")
            per_s = f"{rate / med:10.1f} {b.extra_info.get('unit', 'items')}/s" if rate else ""
            # Fraction of the device ceiling measured in the same run (benchmarks/bench_ops.py).
            frac = ""
            if b.extra_info.get("ceiling_GBps") and b.extra_info.get("bytes"):
                frac = f"  {b.extra_info['bytes'] / med / 1e9 / b.extra_info['ceiling_GBps']:6.1%} of copy"
            elif b.extra_info.get("ceiling_TFLOPs") and b.extra_info.get("flops"):
                frac = f"  {b.extra_info['flops'] / med / 1e12 / b.extra_info['ceiling_TFLOPs']:6.1%} of mm"
            note = ""
            if "bfloat16" in b.name and not torch.cuda.is_available() and bf16_unit() == "none":
                # Emulated in float32: its time is this CPU's, not a bfloat16 result.
                note = "  (no bf16 unit: emulated, not a bf16 speed)"
            tr.write_line(f"  {b.name:<52} median {med * 1e3:9.3f} ms  {ratio} {per_s}{frac}{note}")
