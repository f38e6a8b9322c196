"""The Dist helpers on two real ranks: ``torchrun --nproc-per-node 2 dist_helpers_driver.py OUT``.

Each rank runs every scenario of :data:`SCENARIOS` with a fresh :class:`Dist` (the process group
is made once and kept) and writes what each returned or raised to ``OUT.rank<RANK>`` (JSON), and
how long its clean ``close`` took (``close_s``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.jobs.distributed import Dist


def _fail(what: str):
    raise ValueError(what)


def create_ok(d: Dist):
    return d.create_then_open(lambda: f"created by {d.rank}", lambda: f"opened by {d.rank}")


def create_fails(d: Dist):
    return d.create_then_open(lambda: _fail("no space"), lambda: "opened")


def open_fails(d: Dist):
    return d.create_then_open(lambda: "created", lambda: _fail(f"rank {d.rank} holds another job"))


def together_ok(d: Dist):
    with d.together():
        got = d.all_gather(d.rank)
    return got


def together_rank1_fails(d: Dist):
    with d.together():
        if d.rank == 1:
            _fail("tile 3 diverged")
    return "done"


def together_gather_rank1_fails_early(d: Dist):
    """Rank 0 waits in a gather inside the block while rank 1 fails before reaching it."""
    with d.together(gather=True):
        if d.rank == 1:
            _fail("member 2 diverged")
        d.gather("unit 0")
    return "done"


def together_gather_ok(d: Dist):
    with d.together(gather=True):
        parts = d.gather(f"unit of {d.rank}")
    return parts


SCENARIOS = [create_ok, create_fails, open_fails, together_ok, together_rank1_fails,
             together_gather_rank1_fails_early, together_gather_ok]


def main(out: str) -> None:
    results, keep = {}, None
    for scenario in SCENARIOS:
        d = Dist()
        keep = keep or d  # the first Dist made the process group: it closes it at the end
        try:
            results[scenario.__name__] = {"returned": scenario(d)}
        except Exception as e:
            results[scenario.__name__] = {"raised": type(e).__name__, "message": str(e)}
    # A clean close meets the peers first: rank 1 closes at once, rank 0 a second later.
    t = time.perf_counter()
    if keep.rank == 0:
        time.sleep(1.0)
    keep.close()
    results["close_s"] = time.perf_counter() - t
    Path(f"{out}.rank{keep.rank}").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
