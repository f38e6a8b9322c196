"""The corruption sweep (issue 22): one flipped byte anywhere in a run, kernel or chaos file is
refused with a message naming the file and the damaged part, or changes nothing that is read.

For each file, 64 evenly spaced offsets (plus the first bytes of every region) are flipped (each
byte XOR 0xFF), one copy each, and read back in a subprocess, so that a crash (a segmentation
fault in HDF5) is caught. A read either refuses (an engine ValueError: ``is damaged`` and the
file named) or returns exactly the bits of the undamaged file. Never a crash, never a change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "cnn", "--n-train", "200", "--n-test", "100", "--batch-size", "20", "--eval-train", "100",
         "--quiet"]
N_OFFSETS = 64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sweep")
    run = d / "run.h5"
    assert main(["train", *SMALL, "--steps", "4", "--checkpoints", "0", "--out", str(run)]) == 0
    assert main(["kernel", "--run", str(run), "--x1", "train:12", "--tile", "6", "--quiet",
                 "--out", str(d / "kernel.h5")]) == 0
    assert main(["chaos", *SMALL, "--t0", "0,2", "--t1", "2,4", "--eval-n", "40", "--alphas", "3", "--trace-every",
                 "2", "--out", str(d / "chaos.h5")]) == 0
    return {"run": run, "kernel": d / "kernel.h5", "chaos": d / "chaos.h5"}


def sweep(kind: str, base: Path, work: Path, offsets: list[int]) -> dict[int, dict]:
    """Run the reader over ``offsets`` (-1: undamaged), restarting it after a crash."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results: dict[int, dict] = {}
    todo = list(offsets)
    while todo:
        p = subprocess.run([sys.executable, "-m", "tests.helpers.corrupt_reader", kind, str(base), str(work),
                            *map(str, todo)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
        started = None
        for line in p.stdout.splitlines():
            rec = json.loads(line)
            if rec.get("started"):
                started = rec["offset"]
            else:
                results[rec["offset"]] = rec
                started = None
        if started is not None:  # the process died reading this offset
            results[started] = {"offset": started, "crash": f"exit {p.returncode}: {p.stderr.strip()[-300:]}"}
        todo = [o for o in todo if o not in results]
        if p.returncode == 0 and todo:
            raise AssertionError(f"reader ended early: {p.stderr[-500:]}")
    return results


@pytest.mark.parametrize("kind", ["run", "kernel", "chaos"])
def test_one_flipped_byte_is_refused_or_changes_nothing(files, kind, tmp_path):
    base = files[kind]
    size = base.stat().st_size
    offsets = sorted(set(np.linspace(0, size - 1, N_OFFSETS).astype(int).tolist()) | {0, 8, 511, 512, 600, 1057})
    res = sweep(kind, base, tmp_path, [-1, *offsets])
    clean = res.pop(-1)
    assert "result" in clean, clean
    crashes = {o: r["crash"] for o, r in res.items() if "crash" in r}
    changed = [o for o, r in res.items() if "result" in r and r["result"] != clean["result"]]
    refused = {o: r["refused"] for o, r in res.items() if "refused" in r}
    # each damaged copy is read as damaged-<offset>.h5: the refusal names that file
    unnamed = {o: m for o, m in refused.items() if f"damaged-{o}.h5" not in m or "is damaged" not in m}
    print(f"{kind}: {len(offsets)} offsets of {size} bytes: {len(refused)} refused, "
          f"{len(res) - len(refused) - len(crashes) - len(changed)} read identically, {len(changed)} changed, "
          f"{len(crashes)} crashed")
    assert not crashes, crashes
    assert not changed, f"undetected changes at offsets {changed}"
    assert not unnamed, unnamed
