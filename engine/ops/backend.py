"""One switch for every fused op: ``torch`` (the plain-PyTorch reference), ``triton``,
``ext`` (the compiled ``csrc/`` extension: CUDA on a GPU, C++/OpenMP on the CPU) and
``auto`` (the fastest available on the tensor's device, by measurement; see
``benchmarks/results/README.md``).

An explicitly requested backend that cannot run raises :class:`BackendUnavailableError`
with the reason; ``auto`` never raises for availability and falls back to ``torch``.

``auto`` never compiles: it uses ``ext`` only where the extension is already built for this
torch installation (``entk ext build``, or an earlier explicit ``backend="ext"``, which builds
it), and otherwise silently takes the next backend in its order (Triton on CUDA, then torch).
"""

from __future__ import annotations

import enum
import functools
import os
import warnings

import torch

from ..errors import EngineError, parse_enum


class OpsBackend(enum.StrEnum):
    TORCH = "torch"    # the reference: plain PyTorch
    TRITON = "triton"  # Triton kernels (CUDA, or the CPU interpreter under TRITON_INTERPRET=1)
    EXT = "ext"        # the compiled csrc/ extension
    AUTO = "auto"      # the fastest available


class BackendUnavailableError(EngineError, RuntimeError):
    """A requested backend cannot run here (no Triton, no compiler, wrong device)."""


def parse_backend(backend: str | OpsBackend) -> OpsBackend:
    return parse_enum(OpsBackend, backend, "backend")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"{type(e).__name__}: {e}"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why Triton cannot run on ``device`` (None when it can)."""
    err = _triton_import_error()
    if err is not None:
        return f"triton cannot be imported ({err})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreted():
        return None
    return (f"triton kernels need a CUDA device (got {device.type}); on the CPU set TRITON_INTERPRET=1 "
            "before importing engine to run them in the (slow) interpreter")


def require_triton(op: str, device: torch.device) -> OpsBackend:
    """``triton`` when it can run on ``device``, else a one-line error naming ``op`` and why."""
    why = triton_unavailable_reason(device)
    if why:
        raise BackendUnavailableError(f"{op}: {why}")
    return OpsBackend.TRITON


def triton_on_cuda(device: torch.device) -> bool:
    """Whether ``auto`` may pick Triton: on CUDA only (on the CPU it would be the interpreter)."""
    return device.type == "cuda" and triton_unavailable_reason(device) is None


_warned: set[tuple[str, str]] = set()


def warn_fallback(op: str, backend: OpsBackend, error: Exception) -> None:
    """``auto`` picked a fused backend that failed at run time (a Triton compile error, an
    out-of-resources launch): say so once per op and backend, then the caller uses the reference."""
    key = (op, backend.value)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{op}: the {backend.value} backend failed ({type(error).__name__}: {str(error)[:200]}); "
                      "falling back to the torch reference (pass backend=... to see the error)", stacklevel=3)
