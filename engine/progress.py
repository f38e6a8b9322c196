"""Progress bars for long work: tqdm on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_enabled(quiet: bool = False, stream: Any = None) -> bool:
    """True when a progress bar should be shown: not quiet and stderr is a TTY."""
    if quiet:
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool | None = None,
    unit: str = "it",
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar, disabled unless ``enabled`` (default: stderr is a TTY)."""
    if enabled is None:
        enabled = progress_enabled()
    return tqdm(
        iterable, total=total, desc=desc, disable=not enabled, unit=unit, leave=False, **kwargs
    )
