"""The prepared device scripts must run as they are when a GPU session finally calls them:
device time is too scarce to spend on a script that broke since it was last run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_ops_check_parses():
    res = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_ops_check.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_gpu_tune_ops_dry_run_covers_every_case(tmp_path):
    """--dry-run walks every code path of the sweep on the CPU (interpreter, tiny shapes);
    every case must produce a checked, timed result, none a failure."""
    out = tmp_path / "tune.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_tune_ops.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in rows if "failed" in r], [r for r in rows if "failed" in r]
    cases = {(r["op"], r.get("dtype"), r.get("symmetric"), r.get("backend")) for r in rows}
    assert {("kernel_pairs", d, s, None) for d in ("bfloat16", "float32") for s in (True, False)} <= cases
    assert {("gram_tile", "float32-tf32x3", None, None), ("gram_tile", "bfloat16", None, None)} <= cases
    assert {("kernel_gram", "float32", True, b) for b in ("auto", "triton", "ext")} <= cases
    assert all(r["ms"] > 0 for r in rows)
