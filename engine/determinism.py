"""Deterministic execution: the noise floor of a twin run must be exactly zero."""

from __future__ import annotations

import os

import torch

# cuBLAS needs a fixed workspace for reproducible results (CUDA docs, "Results reproducibility").
CUBLAS_WORKSPACE = ":4096:8"


def set_deterministic(enabled: bool = True) -> None:
    """Turn deterministic algorithms on (or off) for torch, cuDNN and cuBLAS.

    Call before the first CUDA operation: the cuBLAS workspace setting is read
    when the cuBLAS handle is created.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and torch.backends.cudnn.benchmark


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given (validated)."""
    from .errors import ConfigError

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a valid torch device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev
