"""Fixtures of the tests/ntk modules."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def fresh_seed():
    """A new torch seed for the test (modules opt in with ``pytestmark = pytest.mark.usefixtures("fresh_seed")``),
    printed so that pytest shows it with a failure; ``ENTK_TEST_SEED=<seed>`` replays it."""
    seed = int(os.environ.get("ENTK_TEST_SEED", "0")) or torch.seed()
    torch.manual_seed(seed)
    print(f"torch seed {seed} (replay with ENTK_TEST_SEED={seed})")
    return seed
