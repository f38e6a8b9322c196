"""Option groups shared by the subcommands, and the checks every subcommand runs on them."""

from __future__ import annotations

import argparse

NEED_ROOT = "--data cifar10 needs --data-root PATH (a JPEG tree, its .tar.gz, or cifar-10-batches-py)"

DEVICE_HELP = "auto (CUDA if available), cpu, cuda, cuda:N"


def add_device(p, help: str = DEVICE_HELP) -> None:
    p.add_argument("--device", default="auto", help=help)


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
    g.add_argument("--subset-seed", type=int, default=0, metavar="S",
                   help="seed of the subset selection (default: 0)")


def floats(s: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def int_list(s: str, flag: str) -> list[int]:
    from ..errors import EngineError

    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise EngineError(f"{flag} must be comma-separated integers, got {s!r}") from None
