"""Runs one small ``entk ntk`` or ``entk chaos`` job in a fresh process (for torchrun and SIGKILL tests).

``python tests/helpers/shard_driver.py ntk RUN OUT [DIE_RANK DIE_AFTER]``: the kernels of every
checkpoint of RUN (a run of :func:`tiny_train`) on 6 probe images; each rank writes the units it
flagged complete to ``OUT.rank<RANK>`` (under torchrun).

``python tests/helpers/shard_driver.py chaos OUT JSON [DIE_RANK DIE_AFTER]``: the chaos grid of
:func:`tiny_chaos` on :func:`chaos_data`, its summary written to JSON (rank 0).

With DIE_RANK/DIE_AFTER, that rank SIGKILLs itself after DIE_AFTER checkpoint kernels (ntk) or
member measurements (chaos): a rank dying mid-job.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from engine.data import load_synthetic
from engine.jobs import ChaosConfig, checkpoint_kernels, run_chaos, write_summary
from engine.train import TrainConfig, train


def train_data():
    return load_synthetic(200, 60, seed=0)


def tiny_train(path: Path) -> Path:
    """A run of the small cnn with four checkpoints (in this process)."""
    cfg = TrainConfig(model="cnn", steps=8, batch_size=16, checkpoints=[0, 2, 5, 8], eval_train=50,
                      n_train=200, n_test=60)
    train(cfg, out=path, dataset=train_data(), device="cpu", quiet=True)
    return path


def chaos_data():
    return load_synthetic(640, 200, seed=3)


def tiny_chaos() -> ChaosConfig:
    """Four members (base, control at 0, twins at 0 and 6); metrics at t1 = 2, 6, 12; traces every 3 steps."""
    train_cfg = TrainConfig(model="cnn", steps=12, batch_size=32, lr=0.05, checkpoints=[12], eval_train=100)
    return ChaosConfig(train=train_cfg, t0=[0, 6], t1=[2, 6, 12], eps=1e-3, eval_train=64, eval_test=64, alphas=5,
                       strategy="loop", trace_every=3)


def _die_after(n: int, module, name: str) -> None:
    """Wrap ``module.name`` so that this process SIGKILLs itself after its n-th call returns."""
    orig, calls = getattr(module, name), [0]

    def wrapped(*a, **kw):
        out = orig(*a, **kw)
        calls[0] += 1
        if calls[0] >= n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(module, name, wrapped)


def _record_units() -> list[int]:
    """The units this process flags complete, in order (wraps ``BlockWriter.mark_complete``)."""
    from engine.store import blockfile

    orig, units = blockfile.BlockWriter.mark_complete, []

    def mark(self, unit):
        orig(self, unit)
        units.append(int(unit))

    blockfile.BlockWriter.mark_complete = mark
    return units


def main(argv: list[str]) -> int:
    what, rest = argv[0], argv[1:]
    die = rest[2:4] if len(rest) >= 4 else None
    if die and int(os.environ.get("RANK", "0")) == int(die[0]):
        if what == "ntk":
            from engine.store import blockfile

            _die_after(int(die[1]), blockfile.BlockWriter, "mark_complete")
        else:
            import engine.jobs.chaos as chaos_mod

            _die_after(int(die[1]), chaos_mod, "_measure")
    torch.set_num_threads(1)
    if what == "ntk":
        run, out = rest[:2]
        units = _record_units() if "WORLD_SIZE" in os.environ else None  # under torchrun only
        checkpoint_kernels(run, out, probe=6, kernel="full", device="cpu", quiet=True, dataset=train_data())
        if units is not None:
            Path(f"{out}.rank{os.environ['RANK']}").write_text(" ".join(map(str, units)))
    elif what == "chaos":
        out, summary = rest[:2]
        res = run_chaos(tiny_chaos(), out, dataset=chaos_data(), quiet=True)
        if int(os.environ.get("RANK", "0")) == 0:
            write_summary(res, summary)
    else:
        raise SystemExit(f"unknown job {what!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
