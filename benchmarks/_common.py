"""Helpers shared by the benchmark files."""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so a timing covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
