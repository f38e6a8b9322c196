"""Shared fixtures: the real CIFAR-10 archive, a session cache, CUDA skipping, the seed of
random inputs (tests/seeding.py) reported with every failure that drew them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run in the CPU interpreter where there is no GPU. Triton reads this when a
# kernel is decorated, so it is set before any engine.ops.triton module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests import their helpers as tests.seeding, tests._tolerance
    sys.path.insert(0, str(ROOT))

from tests import seeding  # noqa: E402

# Real CIFAR-10 lives outside the project (never committed); ENTK_CIFAR10 overrides.
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _require_real_data() -> bool:
    return os.environ.get("ENTK_REQUIRE_REAL_DATA", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _fresh_test_seed():
    """Every test starts its seeded() draws from a new base seed ($ENTK_TEST_SEED pins it)."""
    seeding.begin_test()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when == "call":
        how = seeding.report()
        if how:
            rep.sections.append(("random inputs", how))


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    """Path to the real CIFAR-10 JPEG archive; skip (or fail when required) if absent."""
    path = Path(os.environ.get("ENTK_CIFAR10", DEFAULT_ARCHIVE))
    if not path.exists():
        msg = f"real CIFAR-10 archive not found at {path} (set ENTK_CIFAR10)"
        if _require_real_data():
            pytest.fail(msg + " and ENTK_REQUIRE_REAL_DATA=1 requires it")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory) -> Path:
    """A decode cache shared by the whole test session (decoding happens once)."""
    env = os.environ.get("ENTK_TEST_CACHE")
    if env:
        return Path(env)
    return tmp_path_factory.mktemp("entk-cache")


@pytest.fixture(scope="session")
def cifar10(cifar_archive, data_cache_dir):
    """Real CIFAR-10 (50,000 train / 10,000 test), decoded once per session."""
    from engine.data import load_cifar10

    return load_cifar10(cifar_archive, cache_dir=data_cache_dir, progress=False)


@pytest.fixture(scope="session")
def bad_input_files(tmp_path_factory) -> Path:
    """The files the bad-input tables name (tests/helpers/refusal_files.py), made once for the CLI's
    table and the API's: a run and its kernels take most of a minute to make on 2 cores."""
    from tests.helpers.refusal_files import make_files

    return make_files(tmp_path_factory.mktemp("robust"))
