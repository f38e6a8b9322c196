"""Empirical NTKs: Jacobians → Gram → kernels and kernel distances.

Definitions: for f(x; θ) with C outputs and N inputs, J has N·C rows (row n·C + c
is ∂f_c(x_n)/∂θ) and P columns (trainable parameters in ``named_parameters``
order, flattened); H = J Jᵀ. The traced kernel sums the C×C output blocks (N×N); the diagonal kernel
keeps the per-sample blocks (N, C, C); the pNTK is the kernel of Σ_c f_c/√C (N×N).
BatchNorm is always in eval mode. Kernel distance (Fort et al. 2020):
S(H₁, H₂) = 1 − ⟨H₁, H₂⟩_F / (‖H₁‖_F ‖H₂‖_F).
"""

from ..store import open_kernel  # reader of entk kernel files
from .distance import (
    DistanceBackend,
    KernelValueError,
    distance_from_gram,
    kernel_distance,
    kernel_gram,
    pairwise_kernel_distance,
)
from .functional import KernelShape, entk_fn
from .gram import KernelKind, gram
from .jacobian import JacobianBackend, jacobian, parameter_layout
from .kernel import entk, jacobian_to_store, num_outputs, param_groups, probe_hash
from .onepass import EntkKernel, Implementation
from .planner import Contraction, ContractionPlan, plan

__all__ = [
    "Contraction",
    "ContractionPlan",
    "DistanceBackend",
    "EntkKernel",
    "Implementation",
    "JacobianBackend",
    "KernelKind",
    "KernelShape",
    "KernelValueError",
    "distance_from_gram",
    "entk",
    "entk_fn",
    "gram",
    "jacobian",
    "jacobian_to_store",
    "kernel_distance",
    "kernel_gram",
    "num_outputs",
    "open_kernel",
    "pairwise_kernel_distance",
    "param_groups",
    "parameter_layout",
    "plan",
    "probe_hash",
]
