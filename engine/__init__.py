"""entk: an engine for empirical NTKs and twin-run training dynamics.

The public API is re-exported here; see README.md for an overview and
docs/FORMAT.md for the HDF5 layouts. Data flows one way:
``data`` → ``models`` → ``train`` → (``ntk`` → ``ops`` → ``analysis``, later issues).
"""

from .data import BatchStream, Dataset, load_cifar10, load_dataset, load_synthetic
from .determinism import resolve_device, set_deterministic
from .errors import (
    ConfigError,
    DataError,
    DataNotFoundError,
    EngineError,
    NonFiniteLossError,
    RunFileError,
)
from .models import MODEL_NAMES, build_model, count_parameters
from .train import RunFile, TrainConfig, TrainResult, parse_iterations, train

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "BatchStream",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "Dataset",
    "EngineError",
    "NonFiniteLossError",
    "RunFile",
    "RunFileError",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "count_parameters",
    "load_cifar10",
    "load_dataset",
    "load_synthetic",
    "parse_iterations",
    "resolve_device",
    "set_deterministic",
    "train",
]
