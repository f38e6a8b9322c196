"""The heap policy of the engine's calls (engine/heap.py): inside a scope glibc keeps freed memory for
reuse, leaving the outermost scope returns it, and a user's own malloc settings are left alone.

Each check runs in a fresh process: the policy is process-wide, and RSS is read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc (Linux)")

# RSS in MiB after: a 256 MiB buffer filled and freed outside any scope (out), inside a scope and
# an inner one (in), after the inner scope closed (inner_closed), after the outer one (closed).
PROBE = r"""
import torch
from engine import heap

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def churn():
    t = torch.empty(64 << 20).fill_(1.0)
    del t

base = rss(); churn(); out = rss() - base
with heap.reusing_freed_memory():
    with heap.reusing_freed_memory():
        base = rss(); churn(); inside = rss() - base
    inner_closed = rss() - base
    active = heap.active()
closed = rss() - base
print(f"{out:.0f} {inside:.0f} {inner_closed:.0f} {closed:.0f} {active} {heap.active()}")
print(heap.describe())
"""


def _child(code: str, **env) -> list[str]:
    e = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS and k not in ("LD_PRELOAD", "ENTK_HEAP")}
    e.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()


def _glibc() -> bool:
    return bool(_child("import engine.heap as h; print(h._glibc() is not None)")[0] == "True")


def test_freed_memory_is_kept_inside_the_scope_and_returned_after():
    if not _glibc():
        pytest.skip("the C library is not glibc")
    nums, said = _child(PROBE)
    out, inside, inner_closed, closed, active, after = nums.split()
    # 256 MiB: outside a scope glibc unmaps it at once; inside, it stays mapped for reuse until
    # the outermost scope closes.
    assert float(out) < 64, nums
    assert float(inside) > 192 and float(inner_closed) > 192, nums
    assert float(closed) < 64, nums
    assert (active, after) == ("True", "False")
    assert said.startswith("glibc keeps freed memory")


@pytest.mark.parametrize("var,value", [("MALLOC_TRIM_THRESHOLD_", "131072"), ("ENTK_HEAP", "glibc")])
def test_a_users_malloc_setting_is_left_alone_and_said(var, value):
    nums, said = _child(PROBE, **{var: value})
    _, inside, *_ = nums.split()
    assert float(inside) < 64, nums
    said_var = "ENTK_HEAP=glibc" if var == "ENTK_HEAP" else var
    assert said == f"the C library's own ({said_var} from the environment)"


def test_ext_status_names_the_heap_policy():
    lines = _child("import sys; from engine.cli import main; sys.exit(main(['ext', 'status', '--device', 'cpu']))")
    assert any(line.startswith("heap policy: ") for line in lines), lines
