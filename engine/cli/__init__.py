"""The ``entk`` command line (also ``python -m engine``): the top parser, errors and exit codes.

Each subcommand lives in its own module (``train``, ``ntk``, ``chaos``, ``reproduce``, ``data``,
``ext``, ``plan``; ``kernel`` also holds ``kernel-predict`` and ``kernel-info``) with an ``add_parser(sub)``
that defines all its flags and a handler that does the work; the option groups they share, the
up-front output checks and the ``--json`` writer are in :mod:`engine.cli.options`.

Exit codes: 0 done; 2 usage and input errors (a bad flag, or an engine error about the input:
every :class:`EngineError` that is not a ``RuntimeError``), printed as one line; 1 runtime
failures (an ``EngineError`` that is a ``RuntimeError``, such as a diverged run, an ``OSError``
during the work, or an unexpected exception, which keeps its traceback); 130 interrupted.
A closed stdout (``entk ... | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import EngineError
from . import chaos, data, ext, kernel, ntk, plan, reproduce, train, verify
from .options import running_as_program

SUBCOMMANDS = (train, ntk, chaos, reproduce, data, ext, kernel, plan, verify)

_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entk",
        description="Empirical NTK engine: train CIFAR networks, compute eNTKs, study "
                    "two-phase learning dynamics (arXiv 2505.13900).",
        epilog="Exit codes: 0 done, 2 usage or input error, 1 runtime failure, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"entk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in SUBCOMMANDS:
        mod.add_parser(sub)
    for p in (parser, *sub.choices.values()):
        # argparse reads "-1e-7" (an exponent) and "-inf" as option names, so `--eps -1e-7` failed with
        # "expected one argument"; no entk option looks like a number, so every such token is a value.
        p._negative_number_matcher = _NEGATIVE_NUMBER
    return parser


def _exit_code(code) -> int:
    """SystemExit's code as an int (argparse exits 0 after --help/--version and 2 on a usage error)."""
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``entk`` command; returns its exit code (never raises SystemExit).

    Run as the program (``argv`` None), a SIGINT that arrives once the command has ended (while it
    reports, or while the interpreter tears down threads and files) is ignored: the exit code is the
    command's, with no traceback.
    """
    running_as_program(argv is None)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # between the command's own handler and the return (reporting, flushing)
        if argv is None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("entk: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if argv is None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return _exit_code(e.code)
    name = f"entk {args.command}"
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`entk ... | head`): stop quietly. Point stdout at devnull so that
        # Python's final flush does not report the same broken pipe again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (captured)
            pass
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        if argv is None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this message
        print(f"{name}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EngineError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME if isinstance(e, RuntimeError) else EXIT_USAGE
    except OSError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
