"""Empirical NTKs: Jacobians → Gram → kernels and kernel distances.

Definitions: for f(x; θ) with C outputs and N inputs, J has N·C rows (row n·C + c
is ∂f_c(x_n)/∂θ) and P columns (trainable parameters in ``named_parameters``
order, flattened); H = J Jᵀ. The traced kernel sums the C×C output blocks (N×N); the diagonal kernel
keeps the per-sample blocks (N, C, C); the pNTK is the kernel of Σ_c f_c/√C (N×N).
BatchNorm is always in eval mode. Kernel distance (Fort et al. 2020):
S(H₁, H₂) = 1 − ⟨H₁, H₂⟩_F / (‖H₁‖_F ‖H₂‖_F).

Modules: ``kinds`` (the vocabulary), ``params`` (columns, per-layer keys, checks), ``rules/``
(one file per layer family), ``capture`` (hooks and output gradients), ``fallback`` (torch.func),
``contract`` (tile products), ``budget`` (working memory), and the front ends ``jacobian``,
``onepass``/``kernel`` (``entk``), ``functional`` (``entk_fn``), ``gram``.
"""

from ..store import open_kernel  # reader of entk kernel files
from .budget import DEFAULT_BUDGET
from .distance import (
    DistanceBackend,
    KernelValueError,
    distance_from_gram,
    kernel_distance,
    kernel_gram,
    pairwise_kernel_distance,
)
from .functional import entk_fn
from .gram import gram
from .jacobian import jacobian, parameter_layout
from .kernel import BlockLayout, entk, entk_blocks, fill_jacobian_store, jacobian_to_store, num_outputs, probe_hash
from .kinds import Implementation, KernelKind
from .planner import Contraction, ContractionPlan, plan

__all__ = [
    "DEFAULT_BUDGET",
    "BlockLayout",
    "Contraction",
    "ContractionPlan",
    "DistanceBackend",
    "Implementation",
    "KernelKind",
    "KernelValueError",
    "distance_from_gram",
    "entk",
    "entk_blocks",
    "entk_fn",
    "fill_jacobian_store",
    "gram",
    "jacobian",
    "jacobian_to_store",
    "kernel_distance",
    "kernel_gram",
    "num_outputs",
    "open_kernel",
    "pairwise_kernel_distance",
    "parameter_layout",
    "plan",
    "probe_hash",
]
