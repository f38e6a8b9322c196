"""Kernel distances (Fort et al. 2020): S(H₁, H₂) = 1 − ⟨H₁, H₂⟩_F / (‖H₁‖_F ‖H₂‖_F).

``kernel_gram`` makes one streaming pass over row tiles of all T kernels and hands each
stacked tile ``(T, rows, cols)`` to the fused op :func:`engine.ops.kernel_pair_products`
(backend switch: ``torch`` reference, ``triton``, ``ext``, ``auto``), adding the tile
partials in float64. At no point are all T whole kernels in memory (T · tile_rows · M
values are). With ``symmetric=True`` only the upper triangle of each kernel is read
(columns [r0, M) of row tile [r0, r1)), half the bytes. The kernels may be tensors, NumPy
arrays or memory maps (``KernelStore.kernels()``, whose kernels are exactly symmetric).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..ops import OpsBackend, kernel_pair_products
from ..ops.backend import parse_backend
from ..progress import progress as progress_bar
from ..store.h5raw import from_numpy, torch_dtype_of
from .budget import DEFAULT_BUDGET, check_budget
from .gram import prefetched

DistanceBackend = OpsBackend  # the one backend switch of engine.ops


class KernelValueError(ConfigError):
    """A kernel contains NaN/Inf or is zero, so a distance would be meaningless."""


def _dtype_of(k) -> torch.dtype:
    if isinstance(k, torch.Tensor):
        return k.dtype
    if getattr(k, "dtype", None) is None:
        return torch.float32  # an array-like read by slicing: widened to float32 tiles
    return torch_dtype_of(k.dtype)  # bfloat16 kernels are stored as uint16 bits


def _tile_dtype(kernels: Sequence) -> torch.dtype:
    """The fused ops read float32 and bfloat16 natively; float64 stays float64 (reference)."""
    dtypes = {_dtype_of(k) for k in kernels}
    if dtypes == {torch.bfloat16}:
        return torch.bfloat16
    if torch.float64 in dtypes:
        return torch.float64
    return torch.float32


def _rows(k, r0: int, r1: int, c0: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(k, torch.Tensor):
        return k[r0:r1, c0:].to(device, dtype)
    t = from_numpy(np.array(k[r0:r1, c0:]))  # a copy: memory maps are read-only
    return t.to(device, dtype)


ROW_ALIGN = 16  # elements: rows of a staged tile start on 64-byte (float32) boundaries


def _staged(kernels: Sequence, r0: int, r1: int, c0: int, device: torch.device, dtype: torch.dtype
            ) -> tuple[torch.Tensor, int]:
    """Rows [r0, r1), columns from about c0 of every kernel, stacked on ``device`` as one
    ``(T, r1 − r0, N)`` tile whose rows start on ``ROW_ALIGN``-element boundaries, with the
    ``diag_offset`` that places it (kernel_pair_products' convention).

    The first column is c0 rounded down to ROW_ALIGN and the row length is padded with zeros
    to a multiple of it (zeros add nothing to any product). Why: Triton vectorises a load
    only when it can prove the row stride a multiple of 16 elements; on an H200 a bfloat16
    tile with N = 8191 read at 2.1 TB/s against 3.8 with N = 8192. The extra columns lie
    below the diagonal in symmetric mode and are never read by the kernels.
    """
    c0a = c0 - c0 % ROW_ALIGN
    width = _check_shapes(kernels)[1] - c0a
    padded = -(-width // ROW_ALIGN) * ROW_ALIGN
    x = torch.empty(len(kernels), r1 - r0, padded, device=device, dtype=dtype)
    x[:, :, width:] = 0
    for i, k in enumerate(kernels):
        x[i, :, :width] = _rows(k, r0, r1, c0a, device, dtype)
    return x, c0a - r0


def _view(k, r0: int, r1: int, c0: int, dtype: torch.dtype) -> torch.Tensor:
    """``k[r0:r1, c0:]`` as a CPU tensor, without a copy where the source allows (tensors of the
    tile dtype, NumPy arrays and memory maps, bfloat16 stored as uint16 bits)."""
    if isinstance(k, torch.Tensor):
        return k[r0:r1, c0:].to("cpu", dtype)
    return from_numpy(np.asarray(k[r0:r1, c0:])).to(dtype)


def _check_shapes(kernels: Sequence) -> tuple[int, int]:
    if len(kernels) == 0:
        raise ConfigError("need at least one kernel")
    shapes = {tuple(k.shape) for k in kernels}
    if len(shapes) != 1:
        raise ConfigError(f"kernels have different shapes {sorted(shapes)}; they must come from the same probe set")
    shape = shapes.pop()
    if len(shape) != 2:
        raise ConfigError(f"kernels must be 2-D matrices, got shape {shape}")
    return shape


# One stacked tile of the T kernels: cache-sized on the CPU; on CUDA a launch must move far more than
# 64 MB to amortise its start. Measurements: benchmarks/results/README.md.
TILE_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def kernel_gram(kernels: Sequence, *, symmetric: bool = False, tile_rows: int | None = None,
                budget_bytes: int = DEFAULT_BUDGET, device: str | torch.device = "cpu",
                backend: str | OpsBackend = "auto", progress: bool | None = False) -> torch.Tensor:
    """G_ij = ⟨H_i, H_j⟩_F for T kernels of equal shape ``(M, M')``: float64 ``(T, T)``.

    Args:
        kernels: T matrices (tensors, NumPy arrays or memmaps; float32, bfloat16 bits or float64).
        symmetric: the kernels are exactly symmetric (eNTKs from :func:`engine.ntk.gram` and
            every ``KernelStore`` are): read only upper triangles. Their lower triangles are
            then never read, so NaN/Inf there would go unseen: pass False for other matrices.
        tile_rows: rows per tile (default: one stacked tile of the T kernels is at most
            :data:`TILE_BYTES` of the device, 64 MB on the CPU and 1 GB on CUDA, and the two
            tiles in flight, the one reduced and the next one read, fit ``budget_bytes``).
        budget_bytes: the working memory (engine.ntk.budget's meaning; default
            :data:`~engine.ntk.budget.DEFAULT_BUDGET`).
        device: where tiles are reduced (``cuda`` for the GPU kernels).
        backend: ``torch`` (float64 reference) | ``triton`` | ``ext`` | ``auto``.

    Raises:
        KernelValueError: NaN/Inf in a kernel (its ⟨H, H⟩ is not finite), naming it.
    """
    b = parse_backend(backend)
    m, n = _check_shapes(kernels)
    if symmetric and m != n:
        raise ConfigError(f"symmetric=True needs square kernels, got {m}×{n}")
    t = len(kernels)
    device = torch.device(device)
    budget_bytes = check_budget(budget_bytes)
    dtype = _tile_dtype(kernels)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if tile_rows is None:
        tile = min(TILE_BYTES["cuda" if device.type == "cuda" else "cpu"], budget_bytes // 2)
        tile_rows = max(1, min(m, tile // max(itemsize * t * n, 1)))
    g = torch.zeros(t, t, dtype=torch.float64, device=device)
    tiles = [(r0, min(r0 + tile_rows, m)) for r0 in range(0, m, tile_rows)]

    # On the CPU each tile is a list of views straight into the sources (memory maps included)
    # and the C++ kernel reads them in place: 16 ms for 16 memory-mapped 2048² kernels
    # (symmetric, 2 cores) against 114 ms when the tiles were first copied into a stack and
    # 11 ms for the op alone. OS readahead serves cold files (rows are read in file order).
    # On CUDA the tile is stacked on the device with 16-element-aligned rows (`_staged`; the
    # caching allocator makes the per-tile buffers cheap; copies are stream-ordered).
    def load(key):
        _, (r0, r1) = key
        c0 = r0 if symmetric else 0
        if device.type == "cpu":
            return [_view(k, r0, r1, c0, dtype) for k in kernels], c0 - r0
        return _staged(kernels, r0, r1, c0, device, dtype)

    bar = progress_bar(total=m, desc="kernel distances", enabled=progress, unit="row")
    for (_, (r0, r1)), (x, diag_offset) in prefetched(list(enumerate(tiles)), load):
        g += kernel_pair_products(x, symmetric=symmetric, diag_offset=diag_offset, backend=b)
        bar.update(r1 - r0)
    bar.close()
    bad = ~torch.isfinite(torch.diagonal(g))
    if bad.any():
        which = bad.nonzero().flatten().tolist()
        raise KernelValueError(f"kernel(s) {which} contain NaN or Inf (or overflow float32 sums); "
                               "distances would be meaningless")
    if not torch.isfinite(g).all():
        raise KernelValueError("kernel inner products overflowed; rescale the kernels")
    return g


def distance_from_gram(g: torch.Tensor) -> torch.Tensor:
    """1 − G_ij / sqrt(G_ii G_jj), float64, exact zeros on the diagonal."""
    norms = torch.sqrt(torch.diagonal(g))
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise KernelValueError(f"kernel(s) {zero} are zero; the cosine distance is undefined")
    s = 1.0 - g / (norms[:, None] * norms[None, :])
    s.fill_diagonal_(0.0)
    return s


def pairwise_kernel_distance(kernels: Sequence, **kwargs) -> torch.Tensor:
    """S_ij = 1 − cos(H_i, H_j) for T kernels: float64 ``(T, T)``, symmetric, zero diagonal.

    Keyword arguments go to :func:`kernel_gram`.
    """
    m, n = _check_shapes(kernels)
    if m != n:
        raise ConfigError(f"kernels must be square (M×M, one row and column per probe output), got {m}×{n}")
    return distance_from_gram(kernel_gram(kernels, **kwargs))


def kernel_distance(h1, h2, **kwargs) -> float:
    """S(H₁, H₂) = 1 − ⟨H₁, H₂⟩_F / (‖H₁‖_F ‖H₂‖_F) as a Python float."""
    s = pairwise_kernel_distance([h1, h2], **kwargs)
    v = float(s[0, 1])
    return v if math.isfinite(v) else float("nan")
