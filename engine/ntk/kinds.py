"""The eNTK vocabulary: which kernel, and how per-sample gradients are formed.

One enum per concept, shared by every front end (``entk``, ``entk_fn``, ``jacobian``, ``gram``)
and the jobs. Rows of the full kernel are ``n·K + c`` (K = C outputs, or 1 for a projection).
"""

from __future__ import annotations

import enum

__all__ = ["Implementation", "KernelKind"]


class KernelKind(enum.StrEnum):
    """The kernel's shape."""

    FULL = "full"          # (N1·C, N2·C), row n·C + c
    TRACED = "traced"      # (N1, N2), Σ_c of the C × C blocks
    DIAGONAL = "diagonal"  # (N, C, C), the per-sample blocks only
    PNTK = "pntk"          # (N1, N2), the kernel of the single output Σ_c f_c / √C


class Implementation(enum.StrEnum):
    """How per-sample parameter gradients are formed (``implementation=`` of every front end)."""

    AUTO = "auto"              # = structured
    STRUCTURED = "structured"  # the layer rules (engine/ntk/rules/), torch.func for the rest
    REFERENCE = "reference"    # torch.func for every column
