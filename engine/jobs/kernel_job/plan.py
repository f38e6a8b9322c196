"""The plan of a kernel job: its kernel kind and compute dtype, the tile size its process memory
allows, and whether the Jacobian blocks are stored or recomputed."""

from __future__ import annotations

import enum
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ...data import Dataset
from ...errors import ConfigError
from ...ntk.budget import JACOBIAN_BLOCK_BYTES, GiB, entk_budget_for
from ...ntk.kinds import KernelKind
from ...store import KernelTiles, StoreError

# A kernel job's memory_bytes (--memory-gb) is the peak memory of its whole process, not the
# working memory that budget_bytes means in engine.ntk (engine.ntk.budget): the job sets aside
# memory_in_use() (the interpreter, the model, the data) and the tiles get the rest, so that
# --memory-gb bounds what a scheduler sees.
DEFAULT_PROCESS_MEMORY = 2 * GiB
# Working memory of one Jacobian call beyond its output (engine.ntk.jacobian keeps a block within
# this with its default budget); small blocks need proportionally less.
JAC_WORKSPACE = JACOBIAN_BLOCK_BYTES
_BASE_OVERHEAD = 64 << 20  # transient copies (a batch, the padded tile write), allocator slack
# The interpreter, torch, its libraries and allocator retention: ~1 GiB resident on a CPU build (measured,
# benchmarks/results/README.md). A constant, not a
# measurement, so that the tile size (and with it the file) is the same in every process and launch.
PROCESS_ALLOWANCE = 1 << 30


def resident_bytes() -> int:
    """This process's resident memory now (for reports and tests; the plan uses :func:`memory_in_use`)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Strategy(str, enum.Enum):  # noqa: UP042
    AUTO = "auto"
    STORED = "stored-jacobian"
    RECOMPUTE = "recompute"


_COMPUTE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_compute_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in _COMPUTE.values():
            return value
        value = str(value)
    key = str(value).removeprefix("torch.")
    if key not in _COMPUTE:
        raise ConfigError(f"compute dtype must be one of {', '.join(_COMPUTE)}, got {value!r}")
    return _COMPUTE[key]


def tile_bytes(t: int, *, c: int, p: int, kind: KernelKind, compute_dtype: torch.dtype,
               sample_bytes: int | None = None) -> int:
    """Estimated peak bytes of one tile pair of ``t`` inputs per side, beside :func:`memory_in_use`.

    Stored J blocks (``sample_bytes`` None): the two J blocks read from disk, their casts, the tile and
    a Jacobian call's workspace. Recomputed (``sample_bytes``: :func:`engine.ntk.kernel.entk_sample_bytes`
    of the model): no J block is held; the tile's ``entk`` call holds the block data of its inputs (2t,
    t for the diagonal kernel) in one block, :func:`recompute_working`, and the tile.
    """
    out = 8 if compute_dtype == torch.float64 else 4
    tile = _tile_out_bytes(t, c, kind, out)
    if sample_bytes is not None:
        return recompute_working(t, kind=kind, sample_bytes=sample_bytes) + tile + _BASE_OVERHEAD
    rows = t if kind is KernelKind.PNTK else t * c
    cast = {torch.float32: 0, torch.bfloat16: 2, torch.float64: 8}[compute_dtype]
    jblocks = 2 * rows * p * (4 + cast)
    return jblocks + tile + min(JAC_WORKSPACE, jblocks) + _BASE_OVERHEAD


def recompute_working(t: int, *, kind: KernelKind, sample_bytes: int) -> int:
    """The working memory a recomputed tile of ``t`` inputs per side gives its ``entk`` call: enough
    for the block data of all its inputs in one block, so no inner block is recomputed."""
    inputs = t if kind is KernelKind.DIAGONAL else 2 * t
    return entk_budget_for(inputs * sample_bytes)


def _tile_out_bytes(t: int, c: int, kind: KernelKind, out: int) -> int:
    """The tile's own bytes while it is formed and written."""
    if kind is KernelKind.FULL:
        return (t * c) ** 2 * out * 4            # product, symmetrised copy, the last tile and its padded copy
    if kind is KernelKind.TRACED:
        return c * t * t * out + 4 * t * t * out  # the C per-output products, then their sum
    if kind is KernelKind.DIAGONAL:
        return 4 * t * c * c * out
    return 4 * t * t * out


def memory_words(memory_bytes: int) -> str:
    """How errors name the process memory: by its flag and its parameter, as either may have set it."""
    return f"--memory-gb {memory_bytes / GiB:.3g} (memory_bytes={memory_bytes:,})"


def choose_tile_inputs(memory_bytes: int, *, n_max: int, in_use: int = 0, **kw) -> int:
    """The largest tile (inputs per side, at most ``n_max``) whose estimate fits ``memory_bytes - in_use``."""
    need = tile_bytes(1, **kw)
    avail = memory_bytes - in_use
    if need > avail:
        used = f" beside the {in_use / GiB:.2f} GiB this process already holds (torch, model, data)" if in_use else ""
        what = (f"two Jacobian rows of {kw['p']:,} parameters and the Jacobian workspace"
                if kw.get("sample_bytes") is None else "the forward data of its inputs and the tile")
        raise ConfigError(f"{memory_words(memory_bytes)} is too small: a tile of one input needs "
                          f"{need / GiB:.3g} GiB ({what}){used}; raise --memory-gb")
    lo, hi = 1, max(1, n_max)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tile_bytes(mid, **kw) <= avail:
            lo = mid
        else:
            hi = mid - 1
    return lo


def memory_in_use(model: nn.Module, inputs: list[torch.Tensor], dataset: Dataset | None = None) -> int:
    """What the process memory holds besides the tiles: :data:`PROCESS_ALLOWANCE`, the model (twice: parameters
    and their gradients' buffers), the selected images, and a caller's dataset. Deterministic."""
    sd = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    data = 0 if dataset is None else sum(t.numel() * t.element_size() for t in
                                         (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test))
    return PROCESS_ALLOWANCE + 2 * sd + sum(u.numel() * u.element_size() for u in inputs) + data


def previous_layout(out: Path, job: dict) -> dict | None:
    """The job of an existing file holding this job (its tile size and strategy are kept), else None.

    A file of this format holding another job is refused here, naming the fields that differ.
    """
    if not out.exists():
        return None
    try:
        prev = KernelTiles(out).job
    except StoreError:
        return None  # not a kernel file: create_for refuses it with its own message
    diff = sorted(k for k, v in _jsonable(job).items() if prev.get(k) != v)
    if diff:
        raise StoreError(f"{out} holds a different job (differs in {', '.join(diff)}); "
                         f"pass overwrite (--overwrite) or choose another output")
    return prev


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def choose_strategy(strategy, kind, t, n1, n2, symmetric, c, p, out, disk_budget, itemsize: int = 4):
    """Store J blocks (each computed once) or recompute them per tile pair; returns (choice, one-line reason).
    ``itemsize``: bytes of one stored J entry (the model's dtype: 8 for a float64 job)."""
    b1, b2 = -(-n1 // t), -(-n2 // t)
    if kind is KernelKind.DIAGONAL:
        return Strategy.RECOMPUTE, "recomputed: the diagonal kernel uses each input block once, nothing to reuse"
    rows = 1 if kind is KernelKind.PNTK else c
    jbytes = (n1 if symmetric else n1 + n2) * rows * p * itemsize
    evals_recompute = b1 * b1 if symmetric else 2 * b1 * b2
    evals_stored = b1 if symmetric else b1 + b2
    if disk_budget is None:
        disk_budget = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free // 2
    cost = f"{evals_stored} block Jacobians instead of {evals_recompute}"
    if strategy is Strategy.STORED:
        return Strategy.STORED, f"stored (--strategy stored-jacobian; {jbytes / GiB:.3g} GiB on disk): {cost}"
    if strategy is Strategy.RECOMPUTE:
        return Strategy.RECOMPUTE, f"recomputed per tile pair (--strategy recompute): {evals_recompute} blocks"
    if evals_recompute == evals_stored:
        return Strategy.RECOMPUTE, "recomputed: one tile, each block's Jacobian is used once"
    if jbytes <= disk_budget:
        return Strategy.STORED, (f"stored beside the output ({jbytes / GiB:.3g} GiB <= disk budget "
                                 f"{disk_budget / GiB:.3g} GiB): {cost}")
    return Strategy.RECOMPUTE, (f"recomputed per tile pair ({evals_recompute} block Jacobians): storing J needs "
                                f"{jbytes / GiB:.3g} GiB > disk budget {disk_budget / GiB:.3g} GiB")
