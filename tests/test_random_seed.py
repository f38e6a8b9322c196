"""tests/seeding.py: random inputs are reproducible from the seed a failing test reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests import seeding

ROOT = Path(__file__).resolve().parents[1]


def test_a_pinned_seed_replays_the_same_draws(monkeypatch):
    monkeypatch.setenv(seeding.SEED_ENV, "1234")
    runs = []
    for _ in range(2):
        assert seeding.begin_test() == 1234
        runs.append([torch.randn(5, generator=seeding.seeded()[0]) for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert not torch.equal(runs[0][0], runs[0][1]), "successive calls in one test draw differently"
    monkeypatch.delenv(seeding.SEED_ENV)
    assert seeding.begin_test() != seeding.begin_test()  # fresh bases (equal with odds 2**-32)


def test_a_failing_test_reports_the_seed_that_replays_it(tmp_path):
    test = tmp_path / "test_draws.py"
    test.write_text("from tests.seeding import seeded\n\n"
                    "def test_draws():\n"
                    "    gen, seed = seeded()\n"
                    "    print('first draw', float(__import__('torch').rand(1, generator=gen)))\n"
                    "    assert False\n")
    env = {k: v for k, v in os.environ.items() if k != seeding.SEED_ENV}
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", str(test),
           "--rootdir", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300).stdout
    assert "random inputs" in first, first[-2000:]
    seed = first.split(f"{seeding.SEED_ENV}=")[1].split()[0]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**env, seeding.SEED_ENV: seed}).stdout
    draw = [ln for ln in first.splitlines() if ln.startswith("first draw")]
    assert draw and draw == [ln for ln in again.splitlines() if ln.startswith("first draw")]
