"""Gram tile with a fused epilogue: H[a-rows, b-rows] = J_a J_bᵀ, and/or its traced kernel.

Rows are ordered n·C + c (sample n, output c). For a tile the op computes, with float32
accumulation from float32 or bfloat16 Jacobian blocks,

    full[i, j]   (+)= Σ_p a[i, p] b[j, p]                         (Ra × Rb)
    traced[n, m] (+)= Σ_c Σ_p a[n·C + c, p] b[m·C + c, p]          (Ra/C × Rb/C)

writing straight into caller-provided outputs (views into the whole kernel are fine),
optionally adding to what is there (``accumulate``: the parameter-group mode sums groups),
and with ``upper=True`` (a and b are the same row block, a diagonal tile of a symmetric
kernel) computing and writing only elements on or above the diagonal (j ≥ i, m ≥ n);
elements below it are left untouched for the caller to mirror.

``want="traced"`` costs 1/C of the full kernel's FLOPs; ``"both"`` produces the traced
kernel from the full one's accumulators in the same pass.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .backend import (
    BackendUnavailableError,
    OpsBackend,
    parse_backend,
    require_triton,
    triton_on_cuda,
    warn_fallback,
)

WANTS = ("full", "traced", "both")


def _check_out(name: str, t: torch.Tensor | None, shape: tuple[int, int], device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        raise ConfigError(f"{name} must be a float32 tensor of shape {shape}")
    if tuple(t.shape) != shape:
        raise ConfigError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ConfigError(f"{name} is on {t.device} but the Jacobian blocks are on {device}")


def _check(a, b, want, num_outputs, out, traced, accumulate, upper):
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ConfigError(f"Jacobian block {name} must be a 2-D tensor (rows, params)")
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"Jacobian block {name} must be float32 or bfloat16, got {x.dtype}")
    if a.dtype != b.dtype or a.device != b.device or a.shape[1] != b.shape[1]:
        raise ConfigError(f"Jacobian blocks must share dtype, device and width; got {a.dtype}/{b.dtype}, "
                          f"{a.device}/{b.device}, {tuple(a.shape)}/{tuple(b.shape)}")
    if want not in WANTS:
        raise ConfigError(f"want must be one of {WANTS}, got {want!r}")
    c = int(num_outputs)
    if c < 1 or a.shape[0] % c or b.shape[0] % c:
        raise ConfigError(f"block rows ({a.shape[0]}, {b.shape[0]}) must be divisible by num_outputs ({num_outputs})")
    if upper and a.shape[0] != b.shape[0]:
        raise ConfigError("upper=True needs a and b to be the same row block (equal row counts)")
    _check_out("out", out, (a.shape[0], b.shape[0]), a.device)
    _check_out("traced", traced, (a.shape[0] // c, b.shape[0] // c), a.device)
    if accumulate and ((want != "traced" and out is None) or (want != "full" and traced is None)):
        raise ConfigError("accumulate=True needs the outputs to add into (out and/or traced)")
    return c


def _store(dst: torch.Tensor, val: torch.Tensor, accumulate: bool, upper: bool) -> None:
    if upper:
        mask = torch.ones_like(val, dtype=torch.bool).triu()
        val = torch.where(mask, val + dst if accumulate else val, dst)
        dst.copy_(val)
    elif accumulate:
        dst += val
    else:
        dst.copy_(val)


def gram_tile_reference(a: torch.Tensor, b: torch.Tensor, *, want: str = "full", num_outputs: int = 1,
                        out: torch.Tensor | None = None, traced: torch.Tensor | None = None,
                        accumulate: bool = False, upper: bool = False):
    """Plain-PyTorch reference (float32 matmul; same contract as :func:`gram_tile`)."""
    c = _check(a, b, want, num_outputs, out, traced, accumulate, upper)
    a32, b32 = a.float(), b.float()
    full_out = traced_out = None
    if want in ("full", "both"):
        full_out = out if out is not None else torch.zeros(a.shape[0], b.shape[0], device=a.device)
        _store(full_out, a32 @ b32.T, accumulate, upper)
    if want in ("traced", "both"):
        traced_out = traced if traced is not None else torch.zeros(a.shape[0] // c, b.shape[0] // c,
                                                                   device=a.device)
        pa = a32.view(-1, c, a.shape[1]).transpose(0, 1)
        pb = b32.view(-1, c, b.shape[1]).transpose(0, 1)
        _store(traced_out, torch.bmm(pa, pb.transpose(1, 2)).sum(0), accumulate, upper)
    return full_out, traced_out


def _backend_for(a: torch.Tensor, backend: OpsBackend) -> OpsBackend:
    if backend is OpsBackend.EXT:
        raise BackendUnavailableError("gram_tile has no csrc/ implementation (cuBLAS plus the Triton epilogue "
                                      "is the fast path); use torch, triton or auto")
    if backend is OpsBackend.TRITON:
        return require_triton("gram_tile", a.device)
    if backend is OpsBackend.AUTO:
        return OpsBackend.TRITON if triton_on_cuda(a.device) else OpsBackend.TORCH
    return backend


def gram_tile(a: torch.Tensor, b: torch.Tensor, *, want: str = "full", num_outputs: int = 1,
              out: torch.Tensor | None = None, traced: torch.Tensor | None = None,
              accumulate: bool = False, upper: bool = False, backend: str | OpsBackend = "auto"):
    """One Gram tile J_a J_bᵀ with its epilogue fused (see the module docstring).

    Args:
        a: ``(Ra, P)`` Jacobian rows, float32 or bfloat16; rows n·C + c.
        b: ``(Rb, P)``, same dtype, device and P.
        want: ``"full"`` (Ra × Rb), ``"traced"`` (Ra/C × Rb/C) or ``"both"``.
        num_outputs: C.
        out, traced: float32 outputs to write (any strides); allocated when None.
        accumulate: add into ``out``/``traced`` instead of overwriting.
        upper: a and b are the same rows; write only j ≥ i (m ≥ n).
        backend: ``torch`` | ``triton`` | ``auto``.

    Returns:
        ``(full, traced)``: each a float32 tensor, or None when not wanted.
    """
    requested = parse_backend(backend)
    b_ = _backend_for(a, requested)
    kw = dict(want=want, num_outputs=num_outputs, out=out, traced=traced, accumulate=accumulate, upper=upper)
    if b_ is OpsBackend.TORCH:
        return gram_tile_reference(a, b, **kw)
    _check(a, b, want, num_outputs, out, traced, accumulate, upper)
    from .triton.gram_tile import gram_tile_triton

    try:
        return gram_tile_triton(a, b, **kw)
    except Exception as e:
        # A failed launch writes nothing (Triton compiles before it launches), so the outputs are
        # as they were and the reference can start over; "both" is two launches, so when adding
        # into existing outputs the first may have landed: then there is no safe fallback.
        if requested is not OpsBackend.AUTO or (accumulate and want == "both"):
            raise
        warn_fallback("gram_tile", b_, e)
        return gram_tile_reference(a, b, **kw)
