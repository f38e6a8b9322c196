"""Data: CIFAR-10 (JPEG tree/archive, official files), synthetic data, batch streams."""

from .cache import default_cache_dir
from .cifar import load_cifar10
from .dataset import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, Dataset, balanced_indices
from .registry import DATASETS, load_dataset
from .stream import BatchStream, eval_batches, normalize
from .synthetic import load_synthetic

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "BatchStream",
    "Dataset",
    "balanced_indices",
    "default_cache_dir",
    "eval_batches",
    "load_cifar10",
    "load_dataset",
    "load_synthetic",
    "normalize",
]
