"""Runs one small kernel_job in a fresh process (for SIGKILL and torchrun tests).

``python tests/helpers/kernel_job_driver.py OUT KIND X1 [X2|-] TILE STRATEGY [DIE_RANK DIE_AFTER]``:
the tiny cnn of tests/test_kernel_job.py on a small synthetic dataset. With DIE_RANK/DIE_AFTER,
that rank SIGKILLs itself after writing DIE_AFTER tiles (a rank dying mid-job). With
ENTK_DRIVER_TILE_PAUSE=SECONDS, each tile write is followed by that pause, so that a test polling
the file from outside can SIGKILL the job mid-way however fast the machine is.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from engine.data import load_synthetic
from engine.jobs import kernel_job
from engine.store import KernelTiles


def tiny_cnn() -> torch.nn.Module:
    from engine.models import build_model

    torch.manual_seed(0)
    return build_model("cnn", width=4)


def main(argv: list[str]) -> int:
    out, kind, x1, x2, tile, strategy = argv[:6]
    if len(argv) > 6 and int(os.environ.get("RANK", "0")) == int(argv[6]):
        die_after, written = int(argv[7]), [0]
        orig = KernelTiles.write_tile

        def write_then_die(self, w, k, block, **kw):
            orig(self, w, k, block, **kw)
            written[0] += 1
            if written[0] >= die_after:
                os.kill(os.getpid(), signal.SIGKILL)

        KernelTiles.write_tile = write_then_die
    pause = float(os.environ.get("ENTK_DRIVER_TILE_PAUSE", "0"))
    if pause > 0:
        orig_pause = KernelTiles.write_tile

        def write_then_pause(self, *a, **kw):
            orig_pause(self, *a, **kw)
            time.sleep(pause)

        KernelTiles.write_tile = write_then_pause
    torch.set_num_threads(1)
    kernel_job(out, model=tiny_cnn(), dataset=load_synthetic(120, 80), model_name="tiny_cnn", x1=x1,
               x2=None if x2 == "-" else x2, kernel=kind, tile_inputs=int(tile), strategy=strategy, quiet=True,
               log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
