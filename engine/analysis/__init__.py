"""Experiments and analyses built on the engine: the Chaos Effect grid and the Cone Effect analysis."""

from .chaos import (
    FIELDS,
    ChaosConfig,
    ChaosResult,
    ChaosStore,
    chaos_grid,
    chaos_transition_of,
    load_chaos,
    run_chaos,
    write_summary,
)
from .cone import (
    ConeAnalysis,
    analyze_cone,
    chaos_transition,
    classical_mds,
    cosine_matrix,
    half_angle,
    load_cone,
    reference_curves,
    suffix_half_angles,
    velocity_curves,
)

__all__ = [
    "FIELDS",
    "ChaosConfig",
    "ChaosResult",
    "ChaosStore",
    "ConeAnalysis",
    "analyze_cone",
    "chaos_grid",
    "chaos_transition",
    "chaos_transition_of",
    "classical_mds",
    "cosine_matrix",
    "half_angle",
    "load_chaos",
    "load_cone",
    "reference_curves",
    "run_chaos",
    "suffix_half_angles",
    "velocity_curves",
    "write_summary",
]
