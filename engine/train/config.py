"""The configuration of one training run: everything that determines its bits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models import MODEL_NAMES
from .schedule import SCHEDULES, milestone_steps


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
        self.milestones = tuple(float(m) for m in self.milestones)
        self.checkpoints = sorted(set(int(i) for i in self.checkpoints) | {self.steps})

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
        need(self.seed >= 0 and self.stream_seed >= 0, "seeds must be non-negative")
        bad = [i for i in self.checkpoints if not 0 <= i <= self.steps]
        need(not bad, f"checkpoint iterations {bad[:5]} are outside [0, {self.steps}]")
        need(self.eval_train >= 0, f"eval_train must be >= 0 (0 = whole train set), got {self.eval_train}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be >= 1 or unset, got {v}")
        return self

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
