"""Memory budgets of the eNTK front ends: one meaning, one default, one per-sample estimate.

``budget_bytes`` is always the working memory of the call: what it holds while it runs beyond its
inputs, the model and its result (block data, Jacobian blocks and column chunks, tiles). Every
front end (``entk``, ``entk_fn``, ``jacobian``, ``gram``, ``jacobian_to_store``, ``kernel_gram``)
defaults to :data:`DEFAULT_BUDGET` and refuses a budget below what one sample needs before any long
work. The block and chunk sizes of the drivers are derived here from the budget and from
:func:`per_sample_bytes`, the one estimate of a sample's working set (built from the layer rules'
workspace estimates).

Two caps below the budget are for speed, not memory: a block or chunk larger than them is no
faster, so the drivers stop there even when the budget allows more.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import heap
from ..errors import ConfigError
from .capture import Plan, Recorder
from .kinds import KernelKind
from .params import Entry

__all__ = [
    "DEFAULT_BUDGET",
    "JACOBIAN_BLOCK_BYTES",
    "GiB",
    "Shares",
    "check_budget",
    "entk_budget_for",
    "entk_shares",
    "jacobian_block_bytes",
    "jacobian_element_bytes",
    "per_sample_bytes",
    "torch_func_blocks",
    "widest_unit",
]

GiB = 1 << 30  # budgets are given in GiB (--budget-gb) and printed in GiB

# 4 GiB holds the block data of 256 resnet20 samples (see per_sample_bytes) in one block, so entk
# recomputes no inner block per tile at the sizes the benchmarks use.
DEFAULT_BUDGET = 4 * GiB
# One block of jacobian(): its output gradients, patches and graph, by per_sample_bytes (which gives
# smaller blocks than jacobian's own estimate did before it: cnn 84 samples instead of 392, vgg11 18
# instead of 51, resnet20 21 instead of 25); the jacobian-<model> groups of benchmarks/bench_ntk.py
# time it. The kernel job sets this much aside for each Jacobian call it makes.
JACOBIAN_BLOCK_BYTES = 256 << 20
# One of entk's two column-chunk buffers: a chunk is formed and then read by the Gram while still in
# the last-level cache, and a small reused buffer is not faulted in afresh for every chunk.
COLUMN_CHUNK_BYTES = 32 << 20


def check_budget(budget_bytes: object) -> int:
    """``budget_bytes`` as a positive int (a float such as ``2e9`` is accepted), else ConfigError."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int | float) \
            or not math.isfinite(budget_bytes) or budget_bytes < 1:
        raise ConfigError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    return int(budget_bytes)


def per_sample_bytes(plan: Plan | None, forward: Callable[[], object], *, k: int, width: int,
                     itemsize: int, fallback: set[int] = frozenset()) -> int:
    """Bytes one input sample adds to a block of the structured drivers (``jacobian``, ``entk``).

    ``plan``: the capture plan (None: every column from torch.func, whose per-sample Jacobian of
    ``k`` rows × ``width`` columns is the estimate); ``forward()``: the model on one sample;
    ``k``: rows per sample; ``itemsize``: bytes of one element of the computation;
    ``fallback``: parameter ids always sent to torch.func (they borrow no gradient).
    """
    if plan is None:
        return max(1, k * width * itemsize)
    rec = Recorder(plan, 1)
    with rec, torch.enable_grad():  # with a graph, so that resolve() sees who borrows a gradient
        forward()
    own = {id(c) for c in rec.resolve(rec.fallback_ids() | set(fallback)) if c.base is None}
    # Held per block: the graph (~2 activations per hooked output) and the K output gradients
    # of the calls that keep their own (a conv feeding only a BatchNorm borrows the BatchNorm's);
    # transient, one layer at a time: the rule's workspace (unfolded patches) and the batched
    # backward's K gradients of the widest activation (twice: input and output of an op).
    held = sum((2 + (k if id(c) in own else 0)) * c.y.numel() for c in rec.calls)
    patches = max((plan.rules[id(c.module)].workspace_elements(c.module, c.a, c.y) for c in rec.calls),
                  default=0)
    widest = max((c.y.numel() for c in rec.calls), default=0)
    return max(1, (held + patches + 2 * k * widest) * itemsize)


def widest_unit(plan: Plan | None, entries: list[Entry]) -> int:
    """The most columns that must be formed together: one output channel of a chunkable layer
    (its weight row and bias), a whole other module, a whole fallback parameter."""
    widest = max(e.end - e.start for e in entries)
    if plan is None:
        return widest
    chunked: set[int] = set()
    units = []
    for m in plan.modules:
        out_ch = plan.rules[id(m)].channels(m)
        width = sum(e.end - e.start for _, e in plan.slots[id(m)])
        if out_ch is not None:
            units.append(width // out_ch)
            chunked.update(id(e.param) for _, e in plan.slots[id(m)])
        else:
            units.append(width)
            chunked.update(id(e.param) for _, e in plan.slots[id(m)])
    units += [e.end - e.start for e in entries if id(e.param) not in chunked]
    return max(units) if units else widest


def jacobian_block_bytes(budget_bytes: int) -> int:
    """The working set of one block of :func:`~engine.ntk.jacobian`: the budget, capped for speed."""
    return min(budget_bytes, JACOBIAN_BLOCK_BYTES)


@dataclass(frozen=True)
class Shares:
    """How :func:`~engine.ntk.entk` spends its budget."""

    chunk: int  # each of the two column-chunk buffers, and one pair product's intermediates
    data: int   # the block data of the row and column blocks (see per_sample_bytes)


def headroom() -> int:
    """entk leaves 1/headroom() of its budget to what its shares do not count (the Gram tile being
    added to, autograd temporaries, allocator slack): 16, or 8 while the engine's heap policy keeps
    freed memory for reuse (engine/heap.py), whose fragmentation adds 5-8% to a call's working peak.
    Without it, the measured working peak exceeded the budget by 3-6%, and by 1-3% more under the
    heap policy (benchmarks/entk_peak_memory.py)."""
    return 8 if heap.keeps_freed_memory() else 16


def entk_shares(budget_bytes: int) -> Shares:
    """Of the budget less its headroom (1/:func:`headroom`), the two column-chunk buffers take at
    most a quarter each (and no more than :data:`COLUMN_CHUNK_BYTES`); the block data gets the rest."""
    usable = budget_bytes - budget_bytes // headroom()
    chunk = min(usable // 4, COLUMN_CHUNK_BYTES)
    return Shares(chunk, usable - 2 * chunk)


def entk_budget_for(data_bytes: int) -> int:
    """The smallest budget (to a few bytes) whose :func:`entk_shares` data share holds ``data_bytes``
    (what an :func:`~engine.ntk.entk` call needs to keep that much block data in one block)."""
    data_bytes = max(1, int(data_bytes))
    # the usable part: the data plus two chunk buffers at their cap, or twice the data below it
    usable = data_bytes + 2 * COLUMN_CHUNK_BYTES if data_bytes >= 2 * COLUMN_CHUNK_BYTES else 2 * data_bytes
    b = usable * headroom() // (headroom() - 1)
    while entk_shares(b).data < data_bytes:
        b += 1 + b // (1 << 20)
    return b


def entk_row_blocks(n1: int, n2: int, kind: KernelKind, per_sample: int, data_bytes: int) -> tuple[int, int]:
    """entk's row blocks of x1 and x2 (``n2`` 0: symmetric): every input in one block if their block
    data fit ``data_bytes`` (:func:`entk_shares`' data share), else a row and a column block of
    equal size."""
    total = n1 + n2 if kind is not KernelKind.DIAGONAL else n1
    if total * per_sample <= data_bytes:
        return n1, max(n2, 1)
    b = max(1, data_bytes // 2 // per_sample)
    return b, b


def jacobian_element_bytes(jdtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Bytes held per Jacobian element by a torch.func column source: vmap's output and its
    concatenation (+ the bfloat16 copy)."""
    return 2 * jdtype.itemsize + (2 if compute_dtype == torch.bfloat16 else 0)


def torch_func_blocks(n1: int, n2: int | None, shape: KernelKind, rows: int, widest: tuple[str, int],
                      elem_bytes: int, budget: int) -> tuple[int, int, int]:
    """:func:`~engine.ntk.entk_fn`'s blocks: (row block of x1, row block of x2, column cap) so that the
    Jacobian blocks in use fit ``budget`` (``elem_bytes``: :func:`jacobian_element_bytes`). Its working
    set is those blocks, not :func:`per_sample_bytes`'s block data: a torch.func column source keeps
    no activations between chunks, and each chunk costs a whole forward and backward per sample, so
    its chunks are as wide as the budget allows rather than cache-sized."""
    name, wcols = widest
    per_col = rows * elem_bytes            # bytes per sample per column
    one = wcols * per_col                  # one sample of the widest parameter
    if shape is KernelKind.DIAGONAL:
        operands, whole = 1, n1
    elif n2 is None:
        operands, whole = (1 if n1 == 1 else 2), n1
    else:
        operands, whole = 2, n1 + n2
    if operands * one > budget:
        each = ", for each of the two row blocks of a tile" if operands == 2 else ""
        raise ConfigError(f"budget_bytes={budget} is too small: one sample of the widest parameter {name!r} "
                          f"({wcols} columns × {rows} output rows × {elem_bytes} B held per element{each}) needs "
                          f"{operands * one} bytes")
    if whole * one <= budget:              # every row in one block (per side): one Jacobian pass per chunk
        return n1, (n2 or n1), budget // (whole * per_col)
    br = budget // (operands * one)
    b1, b2 = min(n1, br), min(n2 or n1, br)
    held = b1 if operands == 1 else b1 + b2
    return b1, b2, budget // (held * per_col)
