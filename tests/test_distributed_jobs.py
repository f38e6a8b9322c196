"""entk ntk and entk chaos under torchrun: 2 CPU ranks (gloo) write the bits of one process; a rank dying mid-job,
then a rerun that resumes and ends with the same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.errors import ConfigError
from engine.jobs.chaos import _sharded_strategy
from engine.store import ChaosStore, KernelStore
from tests.helpers import shard_driver

DRIVER = Path(__file__).parent / "helpers" / "shard_driver.py"


def _torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(DRIVER),
           *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _said(proc: subprocess.CompletedProcess) -> str:
    """What a launch printed, for a failure message: the start (the ranks' own errors come first)
    and the end (torchrun's summary)."""
    err = proc.stderr
    return err if len(err) <= 8000 else f"{err[:4000]}\n[...]\n{err[-4000:]}"


def _one_process(*args):
    n = torch.get_num_threads()
    try:
        shard_driver.main([str(a) for a in args])
    finally:
        torch.set_num_threads(n)


@pytest.mark.slow  # two torchrun launches of two fresh processes each
def test_ntk_two_ranks_a_rank_dies_rerun_resumes_bit_identical_to_one_process(tmp_path):
    run = shard_driver.tiny_train(tmp_path / "run.h5")
    _one_process("ntk", run, tmp_path / "one.h5")
    out = tmp_path / "two.h5"
    # Checkpoint k on rank k % 2: rank 1 SIGKILLs itself after its first kernel (checkpoint 1 of 0..3).
    dead = _torchrun("ntk", run, out, 1, 1)
    assert dead.returncode != 0, _said(dead)
    done = KernelStore(out).complete.tolist()
    assert done[1] and not done[3] and not done[4], f"units done after the crash: {done}"
    again = _torchrun("ntk", run, out)
    assert again.returncode == 0, _said(again)
    ks = KernelStore(out)
    assert ks.complete.all() and ks.completed_iterations() == [0, 2, 5, 8]
    # The rerun computes only the missing checkpoints, each on its rank; the distances (unit 4) once, on
    # rank 0, after every kernel.
    assert (tmp_path / "two.h5.rank1").read_text() == "3"
    assert (tmp_path / "two.h5.rank0").read_text() in ("4", "2 4", "0 2 4")
    # The whole file: layout, every checkpoint's kernel, the distances: the bits of one process.
    assert out.read_bytes() == (tmp_path / "one.h5").read_bytes()


@pytest.fixture(scope="module")
def chaos_one(tmp_path_factory):
    """The chaos grid of the driver in one process (this one): ``(file, JSON summary)``."""
    d = tmp_path_factory.mktemp("chaos-one")
    _one_process("chaos", d / "one.h5", d / "one.json")
    return d / "one.h5", d / "one.json"


@pytest.mark.slow  # two torchrun launches of two fresh processes each
def test_chaos_two_ranks_a_rank_dies_rerun_resumes_bit_identical_to_one_process(tmp_path, chaos_one):
    out, summary = tmp_path / "two.h5", tmp_path / "two.json"
    # Rank 1 (the twin spawned at t0 = 0) SIGKILLs itself after its 2nd measurement, during the t1 = 6 unit:
    # torchrun tears the job down; the t1 = 2 unit stays complete.
    dead = _torchrun("chaos", out, summary, 1, 2)
    assert dead.returncode != 0, _said(dead)
    assert ChaosStore(out).complete.tolist() == [True, False, False]
    assert not summary.exists()
    again = _torchrun("chaos", out, summary)
    assert again.returncode == 0, _said(again)
    # Every unit was computed by 2 ranks (t1 = 2 before the crash, 6 and 12 after it): the bits of one process.
    assert ChaosStore(out).complete.all()
    assert out.read_bytes() == chaos_one[0].read_bytes()
    assert summary.read_bytes() == chaos_one[1].read_bytes()
    rec = json.loads(summary.read_text())
    assert rec["noise_floor"] == 0.0  # the control (rank 0) vs rank 0's base: the same SGD noise
    l2 = {(r["t0"], r["t1"], r["member"]): r["l2"] for r in rec["records"]}
    assert l2[(0, 12, "perturbed")] > 0 and l2[(6, 12, "perturbed")] > 0  # twins on rank 1 and on rank 0


def test_chaos_sharding_refuses_vmap_and_more_ranks_than_members():
    two, cpu, cuda = SimpleNamespace(world=2), torch.device("cpu"), torch.device("cuda")
    assert _sharded_strategy("auto", 4, two, cuda) == "loop"  # auto: loop under torchrun, also on GPUs
    assert _sharded_strategy("loop", 4, two, cpu) == "loop"
    assert _sharded_strategy("vmap", 4, SimpleNamespace(world=1), cpu) == "vmap"  # one process: as given
    with pytest.raises(ConfigError, match=r"--strategy vmap .* not be bit-identical"):
        _sharded_strategy("vmap", 4, two, cpu)
    with pytest.raises(ConfigError, match=r"3 members .* over 4 ranks: launch at most 3"):
        _sharded_strategy("loop", 4, SimpleNamespace(world=4), cpu)
