"""Datasets by name: ``load_dataset("cifar10", root)`` or ``load_dataset("synthetic")``."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

from ..errors import ConfigError
from .cifar import load_cifar10
from .dataset import Dataset
from .synthetic import load_synthetic

DATASETS = ("cifar10", "synthetic")


def load_dataset(name: str, root: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Load a dataset by name: ``"cifar10"`` (needs ``root``) or ``"synthetic"``.

    ``kwargs`` go to :func:`load_cifar10` or :func:`~engine.data.synthetic.load_synthetic`.
    """
    key = str(name).strip().lower()
    if key == "cifar10":
        if root is None:
            raise ConfigError(
                "dataset 'cifar10' needs its location: pass --data-root PATH (root=PATH), a "
                "cifar-10-batches-py folder, a train/ + test/ JPEG tree or its .tar.gz"
            )
        return _call(load_cifar10, root, **kwargs)
    if key == "synthetic":
        return _call(load_synthetic, **kwargs)
    raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def _call(fn: Callable, *args, **kwargs) -> Dataset:
    """``fn(*args, **kwargs)``, with unknown keyword names as a ConfigError."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = ", ".join(p for p in params if p != "root")
        raise ConfigError(f"{fn.__name__} does not take {', '.join(unknown)}; it takes {valid}")
    return fn(*args, **kwargs)
