"""Fused ops behind one backend switch (``torch`` reference, ``triton``, ``ext``, ``auto``).

- :func:`kernel_pair_products`: all-pairs Frobenius inner products of T kernel tiles, the
  hot loop of kernel distances (one pass, upper triangle only for symmetric kernels).
- :func:`gram_tile`: a Gram tile J_a J_bᵀ written straight into the (upper triangle of the)
  output, optionally accumulating and producing the traced kernel in the same pass.

Each op has its plain-PyTorch reference next to it (``*_reference``); ``csrc/`` holds the
compiled extension (:mod:`engine.ops.ext`), built by ``entk ext build`` or an explicit
``backend="ext"`` (``auto`` never compiles) and never required.
"""

from .backend import BackendUnavailableError, OpsBackend
from .gram_tile import gram_tile, gram_tile_reference
from .kernel_pairs import kernel_pair_products, kernel_pairs_reference

__all__ = [
    "BackendUnavailableError",
    "OpsBackend",
    "gram_tile",
    "gram_tile_reference",
    "kernel_pair_products",
    "kernel_pairs_reference",
]
