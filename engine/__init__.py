"""entk: an engine for empirical NTKs and twin-run training dynamics.

The public API is re-exported here; see README.md for an overview and
docs/FORMAT.md for the HDF5 layouts. Data flows one way:
``data`` → ``models`` → ``train`` / ``twins`` → ``store`` → ``ntk`` → ``ops`` (fused kernels
the ``ntk`` loops hand their tiles to; ``ops`` imports nothing above ``errors``) →
``metrics`` / ``analysis`` → ``jobs`` (jobs that read and write files) → ``report``.
"""

from . import wait_policy  # noqa: F401  (first: it sets libgomp's wait policy before torch loads)
from .data import BatchStream, Dataset, load_cifar10, load_dataset, load_synthetic
from .determinism import resolve_device, set_deterministic
from .errors import (
    ConfigError,
    DataError,
    DataNotFoundError,
    EngineError,
    NonFiniteLossError,
    NonFiniteStateError,
    RunFileError,
)
from .jobs import ChaosConfig, checkpoint_kernels, kernel_job, load_chaos, run_chaos
from .models import MODEL_NAMES, build_model, count_parameters
from .ntk import entk, entk_fn, gram, jacobian, jacobian_to_store, kernel_distance, pairwise_kernel_distance
from .ops import BackendUnavailableError, OpsBackend, gram_tile, kernel_pair_products
from .store import JacobianStore, KernelStore, RunFile, StoreError, open_kernel
from .train import TrainConfig, TrainResult, parse_iterations, train
from .twins import MemberSpec, Perturbation, make_fleet

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "BackendUnavailableError",
    "BatchStream",
    "ChaosConfig",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "Dataset",
    "EngineError",
    "JacobianStore",
    "KernelStore",
    "MemberSpec",
    "NonFiniteLossError",
    "NonFiniteStateError",
    "OpsBackend",
    "Perturbation",
    "RunFile",
    "RunFileError",
    "StoreError",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "checkpoint_kernels",
    "count_parameters",
    "entk",
    "entk_fn",
    "gram",
    "gram_tile",
    "jacobian",
    "jacobian_to_store",
    "kernel_distance",
    "kernel_job",
    "kernel_pair_products",
    "load_chaos",
    "load_cifar10",
    "load_dataset",
    "load_synthetic",
    "make_fleet",
    "open_kernel",
    "pairwise_kernel_distance",
    "parse_iterations",
    "resolve_device",
    "run_chaos",
    "set_deterministic",
    "train",
]
