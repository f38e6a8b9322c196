"""Fresh randomness for tests, with the seed to quote in a failure message."""

from __future__ import annotations

import os

import torch


def seeded() -> tuple[torch.Generator, int]:
    """A CPU generator on a fresh seed each run, and that seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed
