"""entk kernel under torchrun: tiles sharded over 2 CPU ranks (gloo), a rank dying mid-job, resume, same bits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import load_synthetic
from engine.jobs import kernel_job
from engine.store import KernelTiles
from tests.helpers.kernel_job_driver import tiny_cnn

DRIVER = Path(__file__).parent / "helpers" / "kernel_job_driver.py"


def _torchrun(*args, timeout=400):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(DRIVER), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # two torchrun launches of two fresh processes each
def test_two_ranks_a_rank_dies_rerun_resumes_bit_identical_to_one_process(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = tmp_path / "one.h5"
        kernel_job(ref, model=tiny_cnn(), dataset=load_synthetic(120, 80), model_name="tiny_cnn", x1="train:14",
                   kernel="traced", tile_inputs=3, strategy="stored-jacobian", log=None, quiet=True)
    finally:
        torch.set_num_threads(n)
    out = tmp_path / "two.h5"
    args = [str(out), "traced", "train:14", "-", "3", "stored-jacobian"]
    # Rank 1 SIGKILLs itself after its 2nd tile: torchrun tears the job down, completed tiles stay.
    dead = _torchrun(*args, "1", "2")
    assert dead.returncode != 0, dead.stderr[-3000:]
    f = KernelTiles(out)
    done = np.flatnonzero(f.complete[: f.n_tiles])
    assert 2 <= len(done) < f.n_tiles, f"tiles done after the crash: {done.tolist()}"
    assert all(k % 2 == 0 for k in done if k not in (1, 3)), "rank 1 wrote tiles beyond its first two?"
    again = _torchrun(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert KernelTiles(out).complete.all()
    assert out.read_bytes() == ref.read_bytes()  # the whole file: layout, inputs, every tile
    assert not list(tmp_path.glob("two.h5.jacobian*"))
