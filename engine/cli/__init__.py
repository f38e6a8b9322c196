"""The ``entk`` command line (also ``python -m engine``): the top parser and the error handling.

Each subcommand lives in its own module (``train``, ``ntk``, ``chaos``, ``reproduce``, ``data``,
``ext``) with an ``add_parser(sub)`` that defines its flags and a ``run(args)`` that does the work;
option groups they share are in :mod:`engine.cli.options`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import EngineError
from . import chaos, data, ext, ntk, reproduce, train

SUBCOMMANDS = (train, ntk, chaos, reproduce, data, ext)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entk",
        description="Empirical NTK engine: train CIFAR networks, compute eNTKs, study "
                    "two-phase learning dynamics (arXiv 2505.13900).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in SUBCOMMANDS:
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except EngineError as e:
        print(f"entk {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"entk {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
