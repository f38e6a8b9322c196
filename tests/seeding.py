"""Fresh randomness for tests, reproducible from one printed seed.

Each test draws a base seed (``$ENTK_TEST_SEED`` when set, else a fresh one); the k-th call of
:func:`seeded` in that test uses ``base + k``. tests/conftest.py resets the base before every
test and, when a test that drew inputs fails, adds a "random inputs" section to its report:
``ENTK_TEST_SEED=<base>`` reruns it on the same inputs.
"""

from __future__ import annotations

import os

import torch

SEED_ENV = "ENTK_TEST_SEED"
_state = {"base": None, "calls": 0}


def begin_test() -> int:
    """Pick this test's base seed (from ``$ENTK_TEST_SEED`` if set) and restart the count."""
    env = os.environ.get(SEED_ENV, "").strip()
    base = int(env, 0) if env else int.from_bytes(os.urandom(4), "little")
    _state.update(base=base, calls=0)
    return base


def seeded() -> tuple[torch.Generator, int]:
    """A CPU generator on this test's next seed, and that seed."""
    if _state["base"] is None:
        begin_test()
    seed = (_state["base"] + _state["calls"]) % 2**32
    _state["calls"] += 1
    return torch.Generator().manual_seed(seed), seed


def report() -> str | None:
    """How to rerun the current test on the same inputs (None if it drew none)."""
    if not _state["calls"]:
        return None
    return (f"seeded() drew {_state['calls']} seed(s) from base {_state['base']}; "
            f"rerun on the same inputs with {SEED_ENV}={_state['base']}")
