"""Analyses of stored results: the Chaos Effect grid and transition, the Cone Effect of a kernel trajectory."""

from .chaos import (
    chaos_grid,
    chaos_transition,
    chaos_transition_of,
    growth_curves,
    growth_rate,
    growth_rate_grid,
    growth_rates,
    growth_transition,
    window_values,
)
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
from .kernel_stats import centred_alignment, effective_rank, label_gram, spectrum, traced

__all__ = [
    "ConeAnalysis",
    "analyze_cone",
    "centred_alignment",
    "chaos_grid",
    "chaos_transition",
    "chaos_transition_of",
    "classical_mds",
    "cosine_matrix",
    "effective_rank",
    "growth_curves",
    "growth_rate",
    "growth_rate_grid",
    "growth_rates",
    "growth_transition",
    "half_angle",
    "label_gram",
    "load_cone",
    "reference_curves",
    "spectrum",
    "suffix_half_angles",
    "traced",
    "velocity_curves",
    "window_values",
]
