"""The configuration of one training run: everything that determines its bits."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models import MODEL_NAMES
from .schedule import SCHEDULES, milestone_steps

SEED_LIMIT = 2**63  # seeds are stored and hashed as int64

_INTS = ("subset_seed", "steps", "batch_size", "warmup_steps", "seed", "eval_train", "eval_batch_size")
_OPTIONAL_INTS = ("n_train", "n_test", "data_seed")
_FLOATS = ("lr", "momentum", "weight_decay", "gamma")
_BOOLS = ("nesterov", "augment", "deterministic")
_STRS = ("model", "data", "schedule")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class TrainConfig:
    """A training run; defaults follow the common CIFAR recipe (He et al. 2016).

    SGD with momentum 0.9, weight decay 1e-4 (on every parameter), batch 128,
    lr 0.1 divided by 10 at 50% and 75% of training. ``checkpoints`` are the
    iterations (number of optimizer steps taken) whose state is saved;
    iteration 0 is the initialization and ``steps`` is always included.
    """

    model: str = "resnet20"
    data: str = "synthetic"
    data_root: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    subset_seed: int = 0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_steps: int = 0
    seed: int = 0
    data_seed: int | None = None
    augment: bool = True
    checkpoints: list[int] = field(default_factory=list)
    deterministic: bool = True
    eval_train: int = 10000
    eval_batch_size: int = 1000

    def __post_init__(self):
        # Conversions that cannot fail on well-typed input; the types themselves are checked by validate().
        try:
            self.milestones = tuple(float(m) for m in self.milestones)
        except (TypeError, ValueError):
            pass
        if _is_int(self.steps) and all(_is_int(i) for i in self.checkpoints):
            self.checkpoints = sorted(set(int(i) for i in self.checkpoints) | {int(self.steps)})

    @property
    def stream_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def schedule_kwargs(self) -> dict:
        return {"lr": self.lr, "schedule": self.schedule, "milestones": self.milestones,
                "gamma": self.gamma, "warmup_steps": self.warmup_steps}

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad field."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        self._check_types()
        need(self.model in MODEL_NAMES, f"model must be one of {', '.join(MODEL_NAMES)}, got {self.model!r}")
        need(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(all(m > 0 for m in self.milestones), f"milestones must be positive, got {list(self.milestones)}")
        ms = milestone_steps(self.milestones, self.steps)
        need(ms == sorted(ms), f"milestones must be increasing, got {list(self.milestones)}")
        for name in ("seed", "data_seed", "subset_seed"):
            v = getattr(self, name)
            need(v is None or 0 <= v < SEED_LIMIT, f"{name} must be in [0, 2**63), got {v}")
        bad = [i for i in self.checkpoints if not 0 <= i <= self.steps]
        need(not bad, f"checkpoint iterations {bad[:5]} are outside [0, {self.steps}]")
        need(self.eval_train >= 0, f"eval_train must be >= 0 (0 = whole train set), got {self.eval_train}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be >= 1 or unset, got {v}")
        return self

    def _check_types(self) -> None:
        """Every field has its type (an int is not a bool, a step count not a float, a rate not a string)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _INTS or (f.name in _OPTIONAL_INTS and v is not None):
                if not _is_int(v):
                    raise ConfigError(f"{f.name} must be an integer, got {v!r}")
            elif f.name in _FLOATS:
                if not _is_number(v):
                    raise ConfigError(f"{f.name} must be a number, got {v!r}")
                if not math.isfinite(v):
                    raise ConfigError(f"{f.name} must be a finite number, got {v!r}")
            elif f.name in _BOOLS and not isinstance(v, bool):
                raise ConfigError(f"{f.name} must be True or False, got {v!r}")
            elif f.name in _STRS and not isinstance(v, str):
                raise ConfigError(f"{f.name} must be a string, got {v!r}")
        if not isinstance(self.milestones, tuple) or not all(_is_number(m) for m in self.milestones):
            raise ConfigError(f"milestones must be numbers, got {self.milestones!r}")
        if not all(_is_int(i) for i in self.checkpoints):
            raise ConfigError(f"checkpoints must be integer iterations, got {self.checkpoints!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields {unknown}")
        return cls(**d)

    def differences(self, other: dict) -> list[str]:
        """Field names whose values differ from ``other`` (a stored ``to_dict``)."""
        mine = self.to_dict()
        return sorted(k for k in set(mine) | set(other) if mine.get(k) != other.get(k))
