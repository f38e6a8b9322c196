"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError

SCHEDULES = ("constant", "multistep", "cosine")


def milestone_steps(milestones: Sequence[float], steps: int) -> list[int]:
    """Milestones as absolute steps: values <= 1 are fractions of ``steps``, larger ones steps.

    One list holds one unit: fractions (all <= 1) or whole steps (none a fraction), never both,
    since ``0.5,3`` could mean either and a wrong guess silently moves the learning-rate drops.
    """
    bad = [m for m in milestones if not math.isfinite(m)]
    if bad:
        raise ConfigError(f"milestones must be finite numbers, got {list(milestones)}")
    if all(m <= 1 for m in milestones):
        return [round(m * steps) for m in milestones]
    if any(m != int(m) for m in milestones):
        raise ConfigError(f"milestones {list(milestones)} mix fractions of the run (<= 1) and steps (> 1): "
                          f"give all as fractions (0.5,0.75) or all as whole steps (500,750)")
    return [int(m) for m in milestones]


def lr_at(step: int, *, lr: float, steps: int, schedule: str = "multistep",
          milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
          warmup_steps: int = 0, final_lr: float = 0.0) -> float:
    """Learning rate used for the update at ``step`` (0-based) of a ``steps``-step run.

    ``warmup_steps`` ramps linearly from ``lr/warmup_steps`` up to the schedule's
    value; ``multistep`` multiplies by ``gamma`` at each milestone; ``cosine``
    anneals from ``lr`` to ``final_lr`` over the steps after warm-up.
    """
    if schedule == "constant":
        base = lr
    elif schedule == "multistep":
        base = lr * gamma ** sum(step >= m for m in milestone_steps(milestones, steps))
    elif schedule == "cosine":
        span = max(steps - warmup_steps, 1)
        frac = min(max(step - warmup_steps, 0) / span, 1.0)
        base = final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * frac))
    else:
        raise ConfigError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return base


def lr_table(steps: int, **kwargs) -> list[float]:
    """``lr_at`` for every step of the run (a later CUDA-graph step reads it from the device)."""
    return [lr_at(s, steps=steps, **kwargs) for s in range(steps)]


def parse_iterations(spec: str | Sequence[int], steps: int, *, include_final: bool = True) -> list[int]:
    """Checkpoint iterations from a spec, sorted and unique, within ``[0, steps]``.

    ``spec`` is a comma list (``"0,1,2,5,10"``) whose items may also be
    ``log:N`` (N log-spaced iterations from 1 to ``steps``, plus 0) or
    ``every:K`` (0, K, 2K, ... up to ``steps``). The final iteration ``steps``
    is included so the trained model is saved, unless ``include_final`` is False
    (selecting among a run's checkpoints: ``entk ntk --checkpoints``).
    """
    items: list[int] = []
    parts = [str(s) for s in spec] if not isinstance(spec, str) else spec.split(",")
    for part in (p.strip() for p in parts):
        if not part:
            continue
        try:
            if part.startswith("log:"):
                n = int(part[4:])
                if n < 1:
                    raise ValueError
                items.append(0)
                if steps >= 1:
                    items += [round(math.exp(math.log(steps) * i / max(n - 1, 1))) for i in range(n)]
            elif part.startswith("every:"):
                k = int(part[6:])
                if k < 1:
                    raise ValueError
                items += list(range(0, steps + 1, k))
            else:
                items.append(int(part))
        except ValueError:
            raise ConfigError(
                f"checkpoint spec item {part!r} is not an integer, log:N or every:K (N, K >= 1)") from None
    bad = [i for i in items if not 0 <= i <= steps]
    if bad:
        raise ConfigError(f"checkpoint iterations {bad[:5]} are outside [0, {steps}] (the run's steps)")
    return sorted(set(items) | ({steps} if include_final else set()))
