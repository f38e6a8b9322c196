"""Training: single runs with crash-safe HDF5 checkpoints (twin fleets build on this)."""

from .config import TrainConfig
from .schedule import SCHEDULES, lr_at, lr_table, parse_iterations
from .trainer import (
    TrainResult,
    evaluate,
    load_momentum,
    make_optimizer,
    momentum_state,
    prepare_data,
    sgd_step,
    train,
)

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_momentum",
    "lr_at",
    "lr_table",
    "make_optimizer",
    "momentum_state",
    "parse_iterations",
    "prepare_data",
    "sgd_step",
    "train",
]
