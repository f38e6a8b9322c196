"""Analyses of stored results: the Chaos Effect grid and transition, the Cone Effect of a kernel trajectory."""

from .chaos import chaos_grid, chaos_transition, chaos_transition_of
from .cone import (
    ConeAnalysis,
    analyze_cone,
    classical_mds,
    cosine_matrix,
    half_angle,
    load_cone,
    reference_curves,
    suffix_half_angles,
    velocity_curves,
)

__all__ = [
    "ConeAnalysis",
    "analyze_cone",
    "chaos_grid",
    "chaos_transition",
    "chaos_transition_of",
    "classical_mds",
    "cosine_matrix",
    "half_angle",
    "load_cone",
    "reference_curves",
    "suffix_half_angles",
    "velocity_curves",
]
