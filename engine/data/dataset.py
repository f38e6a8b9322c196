"""The in-memory dataset every source yields."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from ..errors import ConfigError

# Per-channel statistics of the official CIFAR-10 training set (pixels in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def balanced_indices(y: torch.Tensor, n: int | None, seed: int, num_classes: int) -> torch.Tensor:
    """Ascending indices of the seeded, class-balanced choice of ``n`` of the labels ``y`` (all of
    them when ``n`` is None or at least ``len(y)``): round-robin over the classes, in a seeded order
    within each. :meth:`Dataset.subset` takes these; jobs that select inputs by index use it too."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    if n <= 0:
        raise ConfigError(f"subset size must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    # Rank of each sample within its class under the seeded order; take the lowest ranks.
    ys = y[perm]
    onehot = torch.nn.functional.one_hot(ys, num_classes)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    order = torch.argsort(rank * num_classes + ys, stable=True)[:n]
    return perm[order].sort().values


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 ``(N, 3, H, W)`` and labels as int64 ``(N,)``, train and test.

    ``mean``/``std`` are per-channel statistics (pixels scaled to [0, 1]) used
    to normalize batches; ``source`` says where the data came from.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ConfigError(f"{self.name} {split} images must be uint8 (N, C, H, W), "
                                  f"got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ConfigError(f"{self.name} {split} labels must be int64 ({x.shape[0]},), "
                                  f"got {y.dtype} {tuple(y.shape)}")

    @cached_property
    def fingerprint(self) -> str:
        """A content hash of the data as used: name, classes, and every image and label of both splits.

        Two datasets with the same fingerprint hold the same bytes in the same order, so a
        subset, another source or a changed file all give another value. Files store it, and
        resumed jobs refuse a mismatch.
        """
        h = hashlib.blake2b(digest_size=12)
        h.update(repr((self.name, tuple(self.classes))).encode())
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            t = t.contiguous()
            h.update(repr((str(t.dtype), tuple(t.shape))).encode())
            h.update(t.numpy())
        return "b2:" + h.hexdigest()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
        """A seeded, class-balanced subset (round-robin over classes, seeded order within).

        Deterministic in ``seed``; keeps every class represented even for small sizes.
        """
        def pick(x, y, n):
            if n is None or n >= len(y):
                return x, y
            idx = balanced_indices(y, n, seed, self.num_classes)
            return x[idx].contiguous(), y[idx].contiguous()

        xtr, ytr = pick(self.x_train, self.y_train, n_train)
        xte, yte = pick(self.x_test, self.y_test, n_test)
        return replace(self, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                       meta={**self.meta, "subset": [len(ytr), len(yte), seed]})

    def describe(self) -> str:
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"{self.num_classes} classes, images {self.image_shape}, from {self.source or '?'}")
