"""Training: single runs with crash-safe HDF5 checkpoints (twin fleets build on this)."""

from .config import TrainConfig
from .runfile import RunFile
from .schedule import SCHEDULES, lr_at, lr_table, parse_iterations
from .trainer import TrainResult, evaluate, load_momentum, make_optimizer, momentum_state, sgd_step, train
from .trainer import prepare_data as prepare_data

__all__ = [
    "SCHEDULES",
    "RunFile",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_momentum",
    "lr_at",
    "lr_table",
    "make_optimizer",
    "momentum_state",
    "parse_iterations",
    "sgd_step",
    "train",
]
