"""Metrics comparing two network states (twin runs): parameter dissimilarity, loss
barrier along the linear path, prediction disagreement. See :mod:`engine.metrics.twins`."""

from .twins import BN_MODES, disagreement, loss_barrier, loss_barrier_reference, param_dissimilarity

__all__ = [
    "BN_MODES",
    "disagreement",
    "loss_barrier",
    "loss_barrier_reference",
    "param_dissimilarity",
]
