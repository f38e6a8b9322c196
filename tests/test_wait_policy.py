"""libgomp's wait policy: the engine sets GOMP_SPINCOUNT=10000 before torch loads, never over
the user's choice, and says which is in effect (engine/wait_policy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import os, engine; from engine import wait_policy; "
         "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')); print(wait_policy.describe())")


def _child(code: str, **env) -> list[str]:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    e.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()


def test_importing_the_engine_first_sets_a_short_spin():
    policy, said = _child(PROBE)
    assert policy == "None 10000" and said.startswith("GOMP_SPINCOUNT=10000 (set by entk")


@pytest.mark.parametrize("var,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000")])
def test_the_users_choice_is_kept(var, value):
    policy, said = _child(PROBE, **{var: value})
    assert policy == ("ACTIVE None" if var == "OMP_WAIT_POLICY" else "None 1000")
    assert said == f"{var}={value} (from the environment)"


def test_torch_imported_first_is_left_alone_and_said():
    policy, said = _child("import torch; " + PROBE)
    assert policy == "None None" and said.startswith("libgomp's default: threads spin")


def test_ext_status_names_the_policy():
    lines = _child("import sys; from engine.cli import main; sys.exit(main(['ext', 'status', '--device', 'cpu']))")
    assert any(line.startswith("OpenMP wait policy: GOMP_SPINCOUNT=10000 (set by entk") for line in lines)
