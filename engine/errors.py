"""Errors meant for people.

Every error the engine raises on bad input is a one-line message that names the
thing at fault and what was expected, raised before any long work starts. They
subclass the built-in exception a caller would naturally catch (``ValueError``,
``FileNotFoundError``, ``RuntimeError``) so that generic handlers still work.
"""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """An argument or configuration value is invalid."""


class DataError(EngineError, ValueError):
    """A data source is missing, malformed, or not what was expected."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data path does not exist."""


class RunFileError(EngineError, ValueError):
    """An HDF5 run file is missing, malformed, or does not match the request."""


class NonFiniteLossError(EngineError, RuntimeError):
    """Training produced a NaN or infinite loss."""

    def __init__(self, step: int, loss: float, out: str | None = None):
        self.step = step
        self.loss = loss
        where = f"; checkpoints written so far are kept in {out}" if out else ""
        super().__init__(f"non-finite loss {loss} at step {step}{where}")


class NonFiniteStateError(NonFiniteLossError):
    """Training diverged into NaN/inf weights, buffers or momentum (the last loss may still be finite)."""

    def __init__(self, step: int, names: list[str], loss: float, out: str | None = None):
        self.step, self.loss, self.names = step, loss, list(names)
        where = f"; checkpoints before it are kept in {out}" if out else ""
        shown = ", ".join(self.names[:3]) + (f" and {len(self.names) - 3} more" if len(self.names) > 3 else "")
        EngineError.__init__(self, f"the training state is non-finite after step {step} (in {shown}; last loss "
                                   f"{loss:.4g}): the run diverged, so it is not saved as a checkpoint{where}")


def describe_mismatch(e: Exception) -> str:
    """``load_state_dict``'s error as one line: how many keys are missing or unexpected, the first few of each."""
    missing, unexpected, sizes = [], [], []
    for line in str(e).splitlines():
        line = line.strip().rstrip(".")
        if line.startswith("Missing key(s) in state_dict:"):
            missing = [k.strip(' "') for k in line.split(":", 1)[1].split(",") if k.strip()]
        elif line.startswith("Unexpected key(s) in state_dict:"):
            unexpected = [k.strip(' "') for k in line.split(":", 1)[1].split(",") if k.strip()]
        elif line.startswith("size mismatch for"):
            sizes.append(line.removeprefix("size mismatch for ").split(":")[0])
    parts = []
    for n, what in ((missing, "missing"), (unexpected, "unexpected"), (sizes, "of another shape")):
        if n:
            shown = ", ".join(n[:3]) + (f", ... ({len(n) - 3} more)" if len(n) > 3 else "")
            parts.append(f"{len(n)} {what} ({shown})")
    return "; ".join(parts) or str(e).strip().splitlines()[0]


def parse_enum(enum_cls: type[E], value: object, what: str) -> E:
    """``enum_cls(value)``, or a one-line ``ConfigError`` naming ``what`` and the valid values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in enum_cls)
        raise ConfigError(f"{what} must be one of {valid}, got {value!r}") from None
