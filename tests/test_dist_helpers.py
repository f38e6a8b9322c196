"""Dist.create_then_open and Dist.together: one process here, two real gloo ranks under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.jobs.distributed import Dist, RankFailed

DRIVER = Path(__file__).parent / "helpers" / "dist_helpers_driver.py"


@pytest.fixture
def one(monkeypatch) -> Dist:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return Dist()


def test_one_process_creates_and_never_opens(one):
    opened = []
    assert one.create_then_open(lambda: "created", lambda: opened.append(1)) == "created"
    assert opened == []


def test_one_process_create_error_is_raised_as_is(one):
    def create():
        raise ValueError("no space")
    with pytest.raises(ValueError, match="no space"):
        one.create_then_open(create, lambda: None)


@pytest.mark.parametrize("error", [ValueError("tile 3 diverged"), KeyboardInterrupt()])
@pytest.mark.parametrize("gather", [False, True])
def test_one_process_together_raises_at_once(one, error, gather):
    reached = []
    with pytest.raises(type(error)) as info:
        with one.together(gather=gather):
            raise error
        reached.append(1)
    assert info.value is error and reached == [] and not one.failed


def test_one_process_together_without_error_passes(one):
    with one.together():
        x = 1
    assert x == 1 and not one.failed


def test_launched_rank_reads_the_launcher(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert Dist.launched_rank() == 3
    monkeypatch.delenv("RANK")
    assert Dist.launched_rank() == 0


@pytest.mark.slow  # one torchrun launch of two fresh processes
def test_two_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(DRIVER),
           str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1))
    failed = RankFailed.__name__

    assert r0["create_ok"] == {"returned": "created by 0"}
    assert r1["create_ok"] == {"returned": "opened by 1"}
    # rank 0's create fails: it raises its own error, rank 1 never opens and names rank 0
    assert r0["create_fails"] == {"raised": "ValueError", "message": "no space"}
    assert r1["create_fails"] == {"raised": failed, "message": "rank 0 failed (ValueError: no space)"}
    # rank 1's open fails: rank 0 (which created) raises too, naming rank 1
    assert r1["open_fails"] == {"raised": "ValueError", "message": "rank 1 holds another job"}
    assert r0["open_fails"] == {"raised": failed, "message": "rank 1 failed (ValueError: rank 1 holds another job)"}

    assert r0["together_ok"] == r1["together_ok"] == {"returned": [0, 1]}
    assert r1["together_rank1_fails"] == {"raised": "ValueError", "message": "tile 3 diverged"}
    assert r0["together_rank1_fails"] == {"raised": failed, "message": "rank 1 failed (ValueError: tile 3 diverged)"}
    # with gather, rank 1's closing gather meets rank 0's gather inside the block: no rank waits forever
    assert r1["together_gather_rank1_fails_early"] == {"raised": "ValueError", "message": "member 2 diverged"}
    assert r0["together_gather_rank1_fails_early"] == {"raised": failed,
                                                       "message": "rank 1 failed (ValueError: member 2 diverged)"}
    assert r0["together_gather_ok"] == {"returned": ["unit of 0", "unit of 1"]}
    assert r1["together_gather_ok"] == {"returned": None}
    # A clean close is a barrier: rank 1 waits for rank 0, which arrives a second late, before it
    # tears its connections down (a rank leaving early aborted a torchrun job once).
    assert r1["close_s"] >= 0.9, r1["close_s"]
