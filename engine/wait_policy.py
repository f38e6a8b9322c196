"""libgomp's wait policy for a process that imports the engine.

By default libgomp's threads spin at the end of every parallel region until their partners
arrive. When another process shares the cores, a partner is often descheduled, and the
spinning thread burns the time slice its partner needed: the engine's many short parallel
regions then slow down far more than the other process (benchmarks/results/README.md, wait
policy). A short spin (``GOMP_SPINCOUNT``: :data:`SPINCOUNT` iterations, then the thread sleeps)
keeps the idle speed and most of what ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) gains on shared
cores; both were measured side by side, idle and against a busy competitor. libgomp reads the
variable once, when torch loads it, so :func:`apply` sets it only before ``torch`` is imported,
and never over a value the user chose (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the
environment). Child processes (torchrun ranks, seed workers) inherit it.

This module imports nothing and applies itself on import: ``engine/__init__.py`` imports it first.
"""

from __future__ import annotations

import os
import sys

SPINCOUNT = "10000"
_origin: str | None = None


def apply() -> None:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPINCOUNT` unless the user set a policy or torch is already loaded."""
    global _origin
    if _origin is not None:
        return
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        _origin = "environment"
    elif "torch" in sys.modules:
        _origin = "torch-first"
    else:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        _origin = "engine"


def describe() -> str:
    """One line: the wait policy in effect in this process and who chose it."""
    if _origin == "engine":
        return (f"GOMP_SPINCOUNT={SPINCOUNT} (set by entk: a waiting thread spins briefly, then sleeps, so shared "
                "cores do not stall the engine)")
    if _origin == "environment":
        chosen = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
        return f"{chosen} (from the environment)"
    return ("libgomp's default: threads spin at barriers (torch was imported before entk; set OMP_WAIT_POLICY=PASSIVE "
            "or GOMP_SPINCOUNT=10000 before starting Python on a shared machine)")


apply()
