"""The prepared device script must run as it is when a GPU session finally calls it: device
time is too scarce to spend on a script that broke since it was last run.

``benchmarks/device_check.sh --dry-run`` prints every step and checks, on this CPU, that every
test, benchmark and CLI flag it names exists and collects; the tests here hold it to covering
every benchmark file and every CUDA-marked test, within the 9-minute budget.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def _env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra}


def test_device_check_parses():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> str:
    data = tmp_path_factory.mktemp("data") / "cifar10-jpeg.tar.gz"
    data.write_bytes(b"")  # only its existence is checked in a dry run
    env = _env()
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--data", str(data)], capture_output=True, text=True,
                         timeout=900, env=env, cwd=tmp_path_factory.mktemp("cwd"))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "CHECK FAILED" not in res.stdout
    return res.stdout


def test_dry_run_covers_every_cuda_test_and_benchmark(dry_run):
    steps = dict(re.findall(r"^(\w+)\s+\(timeout\s+(\d+) s\)", dry_run, re.M))
    assert list(steps) == ["info", "ext", "tests", "ops", "ntk", "train", "twins", "study"]
    assert "ext build --device cuda" in dry_run
    assert "-m cuda tests/" in dry_run and re.search(r"^\s+\d+/\d+ tests collected", dry_run, re.M)
    for bench in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        assert f"benchmarks/{bench.name}" in dry_run, f"{bench.name} is not run on the device"
    assert re.search(r"reproduce --preset gpu-paper --steps \d+ .*--data cifar10 --data-root \S+", dry_run)
    budget = int(re.search(r"budget (\d+) s", dry_run).group(1))
    assert budget <= 9 * 60 and all(int(t) <= budget for t in steps.values())


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, what in ((["--data", str(tmp_path / "missing.tar.gz")], "does not exist"),
                       (["--only", "nosuch"], "unknown step"), (["--frobnicate"], "unknown argument")):
        res = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=_env(),
                             timeout=120)
        assert res.returncode == 2 and what in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)


@pytest.mark.slow
def test_tune_sweep_dry_run_covers_every_case(tmp_path):
    """The --tune step's sweep walks every code path on the CPU (interpreter, tiny shapes);
    every case must produce a checked, timed result, none a failure."""
    out = tmp_path / "tune.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_ops.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if "failed" in r], [r for r in rows if "failed" in r]
    cases = {(r["op"], r.get("dtype"), r.get("symmetric"), r.get("backend")) for r in rows}
    assert {("kernel_pairs", d, s, None) for d in ("bfloat16", "float32") for s in (True, False)} <= cases
    assert {("gram_tile", "float32-tf32x3", None, None), ("gram_tile", "bfloat16", None, None)} <= cases
    assert {("kernel_gram", "float32", True, b) for b in ("auto", "triton", "ext")} <= cases
    assert all(r["ms"] > 0 for r in rows)
