"""Experiments and analyses built on the engine: the Chaos Effect grid (and, later, the cone analysis)."""

from .chaos import (
    FIELDS,
    ChaosConfig,
    ChaosResult,
    ChaosStore,
    chaos_grid,
    load_chaos,
    run_chaos,
    write_summary,
)

__all__ = [
    "FIELDS",
    "ChaosConfig",
    "ChaosResult",
    "ChaosStore",
    "chaos_grid",
    "load_chaos",
    "run_chaos",
    "write_summary",
]
