"""All-pairs Frobenius inner products of T kernels: G_ij = ⟨H_i, H_j⟩_F in one pass.

The op works on a *tile* of T kernels, ``x[t] = H_t[r0:r0+R, c0:c0+N]``, and returns that
tile's contribution to G. Callers stream tiles from a store and add the partials in
float64 (:func:`engine.ntk.kernel_gram`).

With ``symmetric=True`` each H_t is taken to be symmetric and only its upper triangle is
read: element (r, c) of the tile lies at global (r0 + r, c0 + c), and with
``diag_offset = c0 − r0`` its weight is 0 below the diagonal (c + diag_offset < r,
never read), 1 on it and 2 above it, so Σ w·x_i·x_j over the tile equals the full
matrices' inner product. A tile of rows [r0, r1) and columns [r0, M) of every kernel
(``diag_offset=0``) therefore covers the rows' whole contribution while reading half.

Precision: products and sums are float32 within a tile of at most a few thousand
elements (exact products for bfloat16 inputs), float64 across tiles; the result is
float64 and exactly symmetric. NaN/Inf in a read element makes G non-finite (the diagonal
entry of its kernel at least), which callers report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from .backend import (
    OpsBackend,
    parse_backend,
    require_triton,
    triton_on_cuda,
    warn_fallback,
)

DTYPES = (torch.float32, torch.bfloat16)  # the fused backends; the reference also takes float64


def _check(x: torch.Tensor, dtypes: tuple = DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"kernel tile must be a torch.Tensor of shape (T, R, N), got {type(x).__name__}")
    if x.ndim != 3:
        raise ConfigError(f"kernel tile must have shape (T, R, N), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ConfigError("kernel tile needs at least one kernel (T ≥ 1)")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ConfigError(f"kernel tile dtype must be one of {names}, got {x.dtype}")


def weights(r: int, n: int, diag_offset: int, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """The symmetric-mode weights, ``(r, n)``: 0 below the diagonal, 1 on it, 2 above."""
    rows = torch.arange(r, device=device)[:, None]
    cols = torch.arange(n, device=device)[None, :] + diag_offset
    return ((cols >= rows).to(dtype) + (cols > rows).to(dtype))


def mirror(g: torch.Tensor) -> torch.Tensor:
    return torch.triu(g) + torch.triu(g, 1).T


def kernel_pairs_reference(x: torch.Tensor, *, symmetric: bool = False, diag_offset: int = 0) -> torch.Tensor:
    """Plain-PyTorch reference: the whole tile in float64. ``(T, R, N)`` → ``(T, T)`` float64."""
    _check(x, (*DTYPES, torch.float64))
    t = x.shape[0]
    x64 = x.to(torch.float64)
    y = x64
    if symmetric:
        w = weights(x.shape[1], x.shape[2], diag_offset, device=x.device)
        x64 = torch.where(w > 0, x64, 0.0)  # select, not multiply: a NaN below the diagonal is not read
        y = x64 * w
    return mirror(y.reshape(t, -1) @ x64.reshape(t, -1).T)


def _backend_for(x: torch.Tensor, backend: OpsBackend) -> OpsBackend:
    from . import ext

    if backend is OpsBackend.TORCH:
        return backend
    if backend is OpsBackend.TRITON:
        return require_triton("kernel_pair_products", x.device)
    if backend is OpsBackend.EXT:
        ext.load(x.device)  # raises BackendUnavailableError with the reason
        return backend
    # auto, by measurement (benchmarks/results/README.md): on the CPU the C++ extension (50x the
    # reference at T=16, M=2048); on an H200, float32 → the CUDA extension (0.97 TB/s symmetric
    # vs Triton's 0.21: Triton's float32 dot runs on CUDA cores), bfloat16 → Triton (1.5 TB/s vs
    # the extension's 0.16: its 2-byte scalar loads).
    if triton_on_cuda(x.device):
        if x.dtype == torch.bfloat16 or not ext.available(x.device):
            return OpsBackend.TRITON
        return OpsBackend.EXT
    if ext.available(x.device):
        return OpsBackend.EXT
    return OpsBackend.TORCH


def _as_list(x) -> list[torch.Tensor]:
    xs = list(x)
    if not xs or not all(isinstance(k, torch.Tensor) and k.ndim == 2 for k in xs):
        raise ConfigError("kernels must be a (T, R, N) tensor or a non-empty sequence of (R, N) tensors")
    if len({(tuple(k.shape), k.dtype, k.device) for k in xs}) != 1:
        raise ConfigError("the kernel tiles of a sequence must share shape, dtype and device")
    return xs


def kernel_pair_products(x: torch.Tensor | Sequence[torch.Tensor], *, symmetric: bool = False,
                         diag_offset: int = 0, backend: str | OpsBackend = "auto") -> torch.Tensor:
    """G_ij = Σ_{r,c} w(r, c) x[i, r, c] x[j, r, c] for a tile of T kernels.

    Args:
        x: ``(T, R, N)`` float32 or bfloat16, on the CPU or a CUDA device; any strides
            (the fused backends read rows with unit column stride and copy otherwise). Or a
            sequence of T ``(R, N)`` tensors (views into separate kernels, memory maps): the
            CPU extension reads them in place; the other backends stack them first.
        symmetric: weight 0/1/2 below/on/above the diagonal (see the module docstring);
            otherwise every element has weight 1.
        diag_offset: global column of tile column 0 minus global row of tile row 0.
        backend: ``torch`` | ``triton`` | ``ext`` | ``auto``.

    Returns:
        ``(T, T)`` float64 on the kernels' device, exactly symmetric.
    """
    xs = None if isinstance(x, torch.Tensor) else _as_list(x)
    probe = x if xs is None else xs[0][None]  # dtype, device and rank, for the checks
    requested = b = parse_backend(backend)
    if probe.dtype == torch.float64 and b is OpsBackend.AUTO:
        b = OpsBackend.TORCH  # float64 kernels: only the reference keeps their precision
    _check(probe, (*DTYPES, torch.float64) if b is OpsBackend.TORCH else DTYPES)
    b = _backend_for(probe, b)
    t, r, n = (x.shape if xs is None else (len(xs), *xs[0].shape))
    if r == 0 or n == 0:
        return torch.zeros(t, t, dtype=torch.float64, device=probe.device)
    if xs is not None and not (b is OpsBackend.EXT and probe.device.type == "cpu"):
        x, xs = torch.stack(xs), None  # only the CPU extension reads separate matrices in place
    if b is OpsBackend.TORCH:
        return kernel_pairs_reference(x, symmetric=symmetric, diag_offset=diag_offset)
    try:
        if b is OpsBackend.TRITON:
            from .triton.kernel_pairs import kernel_pairs_triton

            xc = x if x.stride(2) == 1 else x.contiguous()
            return kernel_pairs_triton(xc, symmetric=symmetric, diag_offset=diag_offset)
        from . import ext

        mod = ext.load(probe.device)
        if xs is not None:
            views = [k if k.stride(1) == 1 else k.contiguous() for k in xs]
            return mod.kernel_pairs_list(views, bool(symmetric), int(diag_offset))
        return mod.kernel_pairs(x if x.stride(2) == 1 else x.contiguous(), bool(symmetric), int(diag_offset))
    except Exception as e:
        if requested is not OpsBackend.AUTO:
            raise
        warn_fallback("kernel_pair_products", b, e)
        return kernel_pairs_reference(x if xs is None else torch.stack(xs), symmetric=symmetric,
                                      diag_offset=diag_offset)
