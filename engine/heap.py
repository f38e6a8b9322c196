"""glibc's heap policy inside the engine's long calls.

glibc hands a request of 32 MiB or more to the kernel as fresh pages (``mmap``) and gives them
back when it is freed, and it returns the free top of its heap once that passes a threshold
(``M_TRIM_THRESHOLD``). An eNTK call allocates and frees the same large buffers block after
block (activations, output gradients, unfolded inputs, column chunks), so each one faults its
pages in again (benchmarks/results/README.md, heap policy). Inside :func:`reusing_freed_memory`
glibc serves every request from its heap and keeps what is freed (``M_MMAP_MAX`` 0, no
trimming), so later blocks reuse pages already mapped; leaving the outermost one sets glibc's usual values back
(up to 65,536 mmaps, trim above 64 MiB: the values glibc itself settles on once a 32 MiB
buffer has been freed) and returns the free memory to the system (``malloc_trim``).

Nothing changes where the C library is not glibc, or when the user chose a policy
(``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``
in the environment, or a malloc in ``LD_PRELOAD``), or set ``ENTK_HEAP=glibc`` (glibc's own policy
throughout, as benchmarks compare).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["active", "describe", "keeps_freed_memory", "reusing_freed_memory", "with_freed_memory_reused"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_USUAL_MMAP_MAX = 65536
_USUAL_TRIM = 64 << 20
_USER_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None


def _reason_to_leave() -> str | None:
    """Why the engine leaves glibc's policy alone in this process, or None."""
    if os.environ.get("ENTK_HEAP") == "glibc":
        return "ENTK_HEAP=glibc from the environment"
    chosen = [v for v in _USER_VARS if v in os.environ]
    if chosen:
        return f"{', '.join(chosen)} from the environment"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "a malloc in LD_PRELOAD"
    if _glibc() is None:
        return "the C library is not glibc"
    return None


@contextmanager
def reusing_freed_memory() -> Iterator[None]:
    """Within: glibc keeps freed memory and serves large requests from it (see the module's text).

    Nested and concurrent uses share one policy; the outermost exit restores glibc's usual values.
    """
    global _depth
    libc = None if _reason_to_leave() else _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, -1)  # -1: never trim (mallopt(3))
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _USUAL_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _USUAL_TRIM)
                libc.malloc_trim(ctypes.c_size_t(0))


F = TypeVar("F", bound=Callable)


def with_freed_memory_reused(fn: F) -> F:
    """Decorator: run ``fn`` inside :func:`reusing_freed_memory`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with reusing_freed_memory():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def describe() -> str:
    """One line: the heap policy of the engine's calls in this process."""
    why = _reason_to_leave()
    if why:
        return f"the C library's own ({why})"
    return "glibc keeps freed memory during eNTK calls and returns it after (no page faults block after block)"


def keeps_freed_memory() -> bool:
    """Whether :func:`reusing_freed_memory` changes glibc's policy in this process."""
    return _reason_to_leave() is None


def active() -> bool:
    """Whether a :func:`reusing_freed_memory` scope is open in this process."""
    return _depth > 0
