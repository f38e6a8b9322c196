"""The ``entk-chaos`` file of the chaos grid job (:mod:`engine.jobs.chaos`); layout in docs/FORMAT.md."""

from __future__ import annotations

from .blockfile import BlockFile


class ChaosStore(BlockFile):
    """``/data/metrics`` (|t1|, K, F) float64 (NaN where t1 < t0), ``/data/realized`` (K, 3)
    [requested, realized_l2, realized_linf], ``/data/slot0``/``slot1`` (K, bytes) fleet state."""

    FORMAT = "entk-chaos"
    NOUN = "entk chaos file"
