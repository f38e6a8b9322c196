"""Memory budgets of the eNTK front ends: one meaning, one default.

``budget_bytes`` is always the working memory of the call: what it holds while it runs beyond its
inputs, the model and its result (block data, Jacobian blocks and column chunks, tiles). Every
front end (``entk``, ``entk_fn``, ``gram``, ``jacobian_to_store``) defaults to :data:`DEFAULT_BUDGET`
and refuses a budget below what one sample needs before any long work.
"""

from __future__ import annotations

import math

from ..errors import ConfigError

__all__ = ["DEFAULT_BUDGET", "check_budget"]

# 4 GiB holds the block data of 256 resnet20 samples (see onepass's per-sample estimate) in one
# block, so entk recomputes no inner block per tile at the sizes the benchmarks use.
DEFAULT_BUDGET = 4 << 30


def check_budget(budget_bytes: object) -> int:
    """``budget_bytes`` as a positive int (a float such as ``2e9`` is accepted), else ConfigError."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int | float) \
            or not math.isfinite(budget_bytes) or budget_bytes < 1:
        raise ConfigError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    return int(budget_bytes)
