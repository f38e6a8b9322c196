"""Gram matrices H = J Jᵀ, in memory or out of core from a stored Jacobian.

The out-of-core path tiles J into row blocks (and column chunks when a row
block would exceed the memory budget), computes only the upper-triangular
tiles H[i, j], j ≥ i, and mirrors them, so the result is exactly symmetric.
Block reads run one step ahead in a background thread (memory-map page-in, or
pinned-memory copy and asynchronous host-to-device transfer on CUDA), so I/O
overlaps the matrix products.

``kernel="traced"`` sums the C×C output blocks, H_tr[n, m] = Σ_c ⟨J[nC+c], J[mC+c]⟩,
computed directly as C batched products (1/C of the full kernel's FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import ConfigError, parse_enum
from ..heap import with_freed_memory_reused
from ..ops import OpsBackend, gram_tile
from ..ops.backend import parse_backend, triton_on_cuda
from ..progress import progress as progress_bar
from ..store import JacobianStore
from ..store.h5raw import from_numpy
from .budget import DEFAULT_BUDGET, check_budget
from .contract import contract, symmetrize
from .kinds import KernelKind


def _kind(kernel: str | KernelKind) -> KernelKind:
    kind = parse_enum(KernelKind, kernel, "kernel")
    if kind not in (KernelKind.FULL, KernelKind.TRACED):
        raise ConfigError(f"gram computes the full or traced kernel of a stored J, got kernel={kind.value!r}; "
                          "use entk for the diagonal kernel and the pNTK")
    return kind


class _Source:
    """Uniform block reads from a tensor, a NumPy array / memmap, or a JacobianStore."""

    def __init__(self, J, device: torch.device, dtype: torch.dtype, fused: bool = False):
        self.bf16_bits = False
        if isinstance(J, JacobianStore):
            done = J.complete
            if not done.all():
                missing = [int(u) for u in np.flatnonzero(~done)]
                raise ConfigError(f"{J.path} is incomplete: {len(missing)} of {len(done)} units (blocks of "
                                  f"{J.block_inputs} inputs) were never written, first unit {missing[0]}; rerun the "
                                  f"job that writes it")
            self.bf16_bits = J.torch_dtype("jacobian") == torch.bfloat16
            J = J.jacobian_memmap()
        if isinstance(J, torch.Tensor):
            if J.ndim != 2:
                raise ConfigError(f"Jacobian must be 2-D (rows, params), got shape {tuple(J.shape)}")
        elif isinstance(J, np.ndarray):
            if J.ndim != 2:
                raise ConfigError(f"Jacobian must be 2-D (rows, params), got shape {J.shape}")
        else:
            raise ConfigError(f"Jacobian must be a torch.Tensor, NumPy array or JacobianStore, got {type(J).__name__}")
        self.J, self.device, self.dtype = J, device, dtype
        # The fused tile op reads bfloat16 blocks as they are (tensor cores, half the transfer),
        # and wants rows 16-element aligned (see _aligned).
        self.fused = fused
        self.rows, self.cols = J.shape
        self.itemsize = 2 if self.bf16_bits else J.dtype.itemsize if isinstance(J, np.ndarray) \
            else J.element_size()

    def _dtype_for(self, t: torch.Tensor) -> torch.dtype:
        return t.dtype if self.fused and t.dtype == torch.bfloat16 else self.dtype

    def load(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        if isinstance(self.J, torch.Tensor):
            blk = self.J[r0:r1, c0:c1]
            return self._aligned(blk.to(self.device, self._dtype_for(blk)))
        a = np.array(self.J[r0:r1, c0:c1])  # copy: page-in happens here, off the main thread
        t = from_numpy(a, str(torch.bfloat16) if self.bf16_bits else None)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return self._aligned(t.to(self._dtype_for(t)))

    def _aligned(self, blk: torch.Tensor) -> torch.Tensor:
        """For the fused op: rows padded with zeros to a multiple of 16 elements (zeros add
        nothing to the products; unaligned rows force scalar loads, see benchmarks/results)."""
        if not self.fused or (blk.stride(0) % 16 == 0 and blk.shape[1] % 16 == 0 and blk.stride(1) == 1):
            return blk
        width = -(-blk.shape[1] // 16) * 16
        out = torch.zeros(blk.shape[0], width, dtype=blk.dtype, device=blk.device)
        out[:, :blk.shape[1]] = blk
        return out


def plan_tiles(rows: int, cols: int, *, itemsize: int, budget_bytes: int, multiple: int = 1,
               block_rows: int | None = None) -> tuple[int, int]:
    """Row-block and column-chunk sizes so that three blocks (two in use, one prefetching)
    fit in ``budget_bytes``; row blocks are a multiple of ``multiple`` (C, for traced tiles)."""
    if block_rows is None:
        block_rows = min(rows, 4096)
    block_rows = max(multiple, block_rows // multiple * multiple)
    block_cols = budget_bytes // max(3 * block_rows * max(itemsize, 4), 1)
    while block_cols < min(cols, 1024) and block_rows > multiple:
        block_rows = max(multiple, block_rows // 2 // multiple * multiple)
        block_cols = budget_bytes // max(3 * block_rows * max(itemsize, 4), 1)
    return block_rows, int(max(1, min(cols, block_cols)))


def prefetched(keys: list, load: Callable) -> Iterator:
    """Yield ``(key, load(key))`` in order with the next load running in a background thread."""
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="entk-prefetch") as pool:
        fut = pool.submit(load, keys[0])
        for i, key in enumerate(keys):
            block = fut.result()
            if i + 1 < len(keys):
                fut = pool.submit(load, keys[i + 1])
            yield key, block


def _fused(backend: OpsBackend, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tiles go through the fused op (engine.ops.gram_tile) rather than plain torch."""
    if backend is OpsBackend.TORCH:
        return False
    if backend is OpsBackend.EXT:
        raise ConfigError("gram has no ext backend (cuBLAS-class products come from triton or torch); "
                          "use torch, triton or auto")
    if dtype != torch.float32:
        if backend is OpsBackend.TRITON:
            raise ConfigError(f"the triton gram accumulates in float32; got dtype={dtype} (use backend='torch')")
        return False
    if backend is OpsBackend.TRITON:
        return True
    return triton_on_cuda(device)  # auto


@with_freed_memory_reused
def gram(J, *, kernel: str | KernelKind = "full", num_outputs: int = 1,
         dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
         out: torch.Tensor | None = None, accumulate: bool = False,
         budget_bytes: int = DEFAULT_BUDGET, block_rows: int | None = None,
         backend: str | OpsBackend = "auto", progress: bool | None = False) -> torch.Tensor:
    """H = J Jᵀ (or the traced kernel) from a Jacobian held anywhere.

    Args:
        J: ``(R, P)`` with R = N·C rows (row n·C + c): a tensor (any device), a
            NumPy array or memmap, or a :class:`~engine.store.JacobianStore`.
        kernel: ``"full"`` → ``(R, R)``; ``"traced"`` → ``(N, N)`` summed over outputs.
        num_outputs: C (needed for ``traced``; R must be divisible by it).
        dtype: accumulation dtype, float32 (default) or float64.
        device: where tiles are multiplied (default: J's device, CPU for files).
        out: write (or, with ``accumulate``, add) into this tensor.
        budget_bytes: the working memory: the Jacobian blocks held at once (two in use, one
            prefetching; default :data:`~engine.ntk.budget.DEFAULT_BUDGET`).
        backend: ``torch`` (tile products in PyTorch) | ``triton`` (the fused Gram-tile op:
            bfloat16 blocks stay bfloat16, diagonal tiles compute only their upper triangle,
            results land in ``out`` directly) | ``auto`` (Triton on CUDA for float32).

    Returns:
        The symmetric kernel on ``device`` (or ``out``).
    """
    kind = _kind(kernel)
    budget_bytes = check_budget(budget_bytes)
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"gram accumulation dtype must be float32 or float64, got {dtype}")
    if device is None:
        device = J.device if isinstance(J, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    requested = parse_backend(backend)
    fused = _fused(requested, dtype, device)
    op_backend = requested.value if fused else "torch"  # auto keeps the op's fallback to the reference
    src = _Source(J, device, dtype, fused=fused)
    c = int(num_outputs)
    if kind is KernelKind.TRACED and (c < 1 or src.rows % c):
        raise ConfigError(f"traced kernel needs rows ({src.rows}) divisible by num_outputs ({c})")
    m = src.rows // c if kind is KernelKind.TRACED else src.rows
    mult = c if kind is KernelKind.TRACED else 1
    if out is None:
        out = torch.zeros(m, m, dtype=dtype, device=device)
        accumulate = True
    elif out.shape != (m, m):
        raise ConfigError(f"out must have shape {(m, m)}, got {tuple(out.shape)}")
    elif not accumulate:
        out.zero_()

    br, bc = plan_tiles(src.rows, src.cols, itemsize=src.itemsize, budget_bytes=budget_bytes,
                        multiple=mult, block_rows=block_rows)
    row_blocks = [(r, min(r + br, src.rows)) for r in range(0, src.rows, br)]
    col_chunks = [(k, min(k + bc, src.cols)) for k in range(0, src.cols, bc)]
    if isinstance(J, torch.Tensor) and J.device == device and len(row_blocks) == 1:
        # Everything is already in memory on the right device: one product per column chunk.
        for c0, c1 in col_chunks:
            blk = src.load(0, src.rows, c0, c1)
            _accumulate(out, blk, blk, kind, c, fused, op_backend, upper=True)
        return symmetrize(out)

    # Load order: for each column chunk and row block i, block i, then blocks j > i.
    keys = [(ci, i, j) for ci in range(len(col_chunks)) for i in range(len(row_blocks))
            for j in range(i, len(row_blocks))]

    def load(key):
        ci, _, j = key
        c0, c1 = col_chunks[ci]
        r0, r1 = row_blocks[j]
        return src.load(r0, r1, c0, c1)

    bar = progress_bar(total=len(keys), desc="gram tiles", enabled=progress, unit="tile")
    a = None
    for (_, i, j), blk in prefetched(keys, load):
        if j == i:
            a = blk
        r0, r1 = (x // mult for x in row_blocks[i])
        s0, s1 = (x // mult for x in row_blocks[j])
        _accumulate(out[r0:r1, s0:s1], a, blk, kind, c, fused, op_backend, upper=i == j)
        bar.update()
    bar.close()
    # Mirror the strictly upper tiles (and the diagonal tiles' upper halves) downward.
    return symmetrize(out)


def _accumulate(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kind: KernelKind, c: int, fused: bool,
                backend: str, upper: bool) -> None:
    if not fused:
        # engine.ntk.contract's tile product on (n, C, w) operands (C = 1 for the full kernel);
        # a diagonal tile (a is b) computes only its upper triangle, mirrored by symmetrize.
        k = c if kind is KernelKind.TRACED else 1
        contract(dst, a.view(-1, k, a.shape[1]), None if upper else b.view(-1, k, b.shape[1]), kind, upper, None)
    elif kind is KernelKind.FULL:
        gram_tile(a, b, want="full", num_outputs=1, out=dst, accumulate=True, upper=upper, backend=backend)
    else:
        gram_tile(a, b, want="traced", num_outputs=c, traced=dst, accumulate=True, upper=upper, backend=backend)
