"""Option groups shared by the subcommands, and the checks every subcommand runs on them."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, EngineError
from ..ntk.budget import GiB

NEED_ROOT = "--data cifar10 needs --data-root PATH (a JPEG tree, its .tar.gz, or cifar-10-batches-py)"

DEVICE_HELP = "auto (CUDA if available), cpu, cuda, cuda:N"


_as_program = False  # set by engine.cli.main when it runs as the program (argv from the command line)


def running_as_program(flag: bool) -> None:
    global _as_program
    _as_program = flag


def work_done() -> None:
    """The command's work is complete and only its report is left: from here on a Ctrl-C is
    ignored (when running as the program), so the exit code is the work's, not 130."""
    if _as_program and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def add_device(p, help: str = DEVICE_HELP, choices: Sequence[str] | None = None) -> None:
    p.add_argument("--device", default="auto", choices=choices, help=help)


def add_quiet(p, help: str = "no progress bar") -> None:
    p.add_argument("--quiet", action="store_true", help=help)


def add_overwrite(p, help: str = "replace --out if it holds a different job") -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_data_root(p, help: str = "CIFAR-10 location: a JPEG tree (train/<class>/*.jpg, test/<class>/*.jpg), "
                                 "its .tar.gz, or torchvision's cifar-10-batches-py folder") -> None:
    p.add_argument("--data-root", metavar="PATH", help=help)


def add_json(p, help: str) -> None:
    p.add_argument("--json", metavar="FILE", help=help)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The dataset group of `train`, `chaos`, `reproduce` and `data`."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=["synthetic", "cifar10"],
                   help="dataset: 'synthetic' (seeded, class-structured, needs no files; default) "
                        "or 'cifar10' (needs --data-root)")
    add_data_root(g)
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where decoded CIFAR-10 is cached (default: $ENTK_CACHE_DIR or ~/.cache/entk)")
    g.add_argument("--n-train", type=int, metavar="N",
                   help="use a seeded class-balanced subset of N training images (default: all)")
    g.add_argument("--n-test", type=int, metavar="N",
                   help="use a seeded class-balanced subset of N test images (default: all)")
    g.add_argument("--subset-seed", type=seed, default=0, metavar="S",
                   help="seed of the subset selection (default: 0)")


SEED_LIMIT = 2**63  # seeds are int64 wherever they are stored or hashed


def positive_float(s: str) -> float:
    """argparse type: a finite number > 0 (``inf`` and ``nan`` are refused by name)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}")
    return v


def seed(s: str) -> int:
    """argparse type: a seed, an integer in [0, 2**63)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {s!r}") from None
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {s}")
    return v


def budget_bytes(flag: str, gb: float) -> int:
    """``--budget-gb`` or ``--memory-gb`` GiB as whole bytes; under one byte is refused with the value given."""
    b = int(gb * GiB)
    if b < 1:
        raise ConfigError(f"{flag} {gb:g} is less than one byte; expected at least {1 / GiB:.3g} (GiB)")
    return b


def floats(s: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def int_list(s: str, flag: str, *, limit: int | None = None) -> list[int]:
    """Comma-separated integers; an empty list is an error (it never means "the default")."""
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise EngineError(f"{flag} must be comma-separated integers, got {s!r}") from None
    if not vals:
        raise EngineError(f"{flag} is empty; expected comma-separated integers (leave the flag out for the default)")
    if limit is not None:
        bad = [v for v in vals if not 0 <= v < limit]
        if bad:
            raise EngineError(f"{flag} must be in [0, 2**63), got {bad[0]}")
    return vals


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_dir(flag: str, path: Path, d: Path) -> None:
    """Create (and remove) a file in ``d``: the one test that also holds for root and read-only mounts."""
    try:
        with tempfile.TemporaryFile(dir=d, prefix=".entk-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {d} ({e.strerror or e})") from None


def check_outputs(*, files: Sequence[tuple[str, str | None]] = (),
                  dirs: Sequence[tuple[str, str | None]] = (),
                  inputs: Sequence[tuple[str, str | None]] = ()) -> None:
    """Refuse, before any work starts, every output that could not be written: one line naming the flag.

    ``files`` and ``dirs`` are ``(flag, path)`` pairs (``None`` paths are skipped): output files
    (an existing one is resumed or replaced, so a directory there is refused) and output
    directories (an existing file there is refused). No output may be one of the ``inputs``
    or another output. Missing parent directories are created once every check has passed.
    """
    seen: dict[Path, str] = {Path(raw).resolve(): flag for flag, raw in inputs if raw is not None}
    todo: list[Path] = []
    for kind, pairs in (("file", files), ("dir", dirs)):
        for flag, raw in pairs:
            if raw is None:
                continue
            path = Path(raw)
            key = path.resolve()
            if key in seen:
                raise ConfigError(f"{seen[key]} and {flag} name the same path {raw}")
            seen[key] = flag
            if path.exists():
                if kind == "file" and path.is_dir():
                    raise ConfigError(f"{flag} {raw} is a directory; expected a file path")
                if kind == "dir" and not path.is_dir():
                    raise ConfigError(f"{flag} {raw} is a file; expected a directory")
                if kind == "file" and not os.access(path, os.W_OK):
                    raise ConfigError(f"{flag} {raw} is not writable")
                if kind == "dir":
                    _probe_dir(flag, path, path)
                continue
            base = _nearest_existing(path.parent)
            if not base.is_dir():
                raise ConfigError(f"{flag} {raw}: {base} is a file, not a directory")
            _probe_dir(flag, path, base)
            todo.append(path if kind == "dir" else path.parent)
    for d in todo:
        d.mkdir(parents=True, exist_ok=True)


def _jsonable(o):
    # NumPy scalars and arrays from file attributes; anything else by its text.
    return o.tolist() if hasattr(o, "tolist") else str(o)


def write_json(path: str | Path, command: str, record: dict) -> None:
    """The ``--json`` summary of every subcommand: one object, ``command`` and ``version`` first.

    Written to a temporary file beside ``path`` and renamed, so a reader never sees half of it.
    """
    from .. import __version__

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump({"command": command, "version": __version__, **record}, f, indent=2, allow_nan=True,
                  default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
