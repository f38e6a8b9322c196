"""The study presets of ``entk reproduce`` and their plan: what each runs and how long it should take.

* ``quick`` (the default): synthetic CIFAR-shaped data, one seed, small grids; the same stages,
  report and figures as the long presets, in minutes on 2 CPU cores.
* ``cpu-basins``: real CIFAR-10 (10,000 training images), cnn, 3 seeds, 2000 steps with lr ÷10
  at steps 1000 and 1500, t0 ∈ {0, 10, 40, 150, 400, 1000}, t1 ∈ {300, 1000, 2000}, an
  independent reference and spawn references at three t0: long enough for the twins to end in
  (or out of) the base's basin. ``cpu-basins-constant``: the same at a constant learning rate.
  ``--model resnet20`` is the paper's model.
* ``gpu-fig3``: the paper's Figure 3 (full CIFAR-10, 160 epochs, lr ÷10 at 50% and 75%),
  ResNet-20 or ``--model vgg16`` with the paper's t0 grids, t1 to the end of training, 3 seeds.
* ``cpu-small`` and ``gpu-paper``: the earlier presets (in-basin sensitivity over short windows).

:func:`plan` counts the work of a preset (member-steps of SGD, metric evaluations, eNTK
backward passes) and :func:`project_seconds` turns it into time from a rate: measured on this
machine (:func:`measure_step_seconds`, a few SGD steps of the model) or, for a GPU that is not
there, an assumed rate that the plan says is assumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError
from ..models import build_model

PRESETS = ("quick", "cpu-basins", "cpu-basins-constant", "gpu-fig3", "cpu-small", "gpu-paper")
# Assumed H100 rates (SGD steps per second of one member at batch 128, loop over members) for the
# --dry-run of gpu-fig3 on a machine without the GPU: not measured here; the plan says so.
ASSUMED_GPU_STEPS_PER_S = {"resnet20": 60.0, "vgg16": 40.0}


def log_schedule(steps: int, n: int = 40) -> list[int]:
    """0, every iteration up to 10, then ``n`` log-spaced iterations up to ``steps``."""
    pts = {0, *range(1, min(10, steps) + 1), steps}
    if steps > 10:
        pts |= {round(float(v)) for v in np.geomspace(10, steps, n)}
    return sorted(pts)


@dataclass
class Preset:
    name: str
    model: str
    steps: int
    n_train: int | None
    checkpoints: list[int]
    probe: int
    t0: list[int]
    t1: list[int]
    eval_n: int
    eps: float = 1e-7
    batch_size: int = 128
    lr: float = 0.1
    schedule: str = "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)
    window: int = 100          # Δ of the growth rates and of the fixed-window metrics
    trace_every: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    alphas: int = 11
    description: str = ""
    independent: bool = False  # the reference run from another initialisation
    spawn_t0: list[int] = field(default_factory=list)
    gpu: bool = False          # projected with an assumed GPU rate when no GPU is there


def _scaled(ts, s: int, base: int) -> list[int]:
    return sorted({round(t * s / base) for t in ts})


def _steps(steps, default: int) -> int:
    if steps is None:
        return default
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {steps}")
    return int(steps)


_BASIN_T0 = [0, 10, 40, 150, 400, 1000]
_BASIN_T1 = [300, 1000, 2000]
_BASIN_SPAWN = [0, 150, 1000]
_FIG3_T0 = {"resnet20": [0, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000], "vgg16": list(range(0, 10_001, 250))}
_FIG3_STEPS = 62_400  # 160 epochs of 390 batches of 128
_FIG3_T1 = [1000, 5000, 10_000, 20_000, 31_200, 62_400]


def preset(name: str, *, model: str | None = None, steps: int | None = None) -> Preset:
    """The named preset; ``steps`` rescales its grids (module docstring)."""
    if name == "quick":
        s = _steps(steps, 150)
        return Preset(name, model or "cnn", s, 2000, log_schedule(s, 8), 16, _scaled([0, 10, 40], s, 150),
                      _scaled([75, 150], s, 150), 200, alphas=5, schedule="multistep",
                      window=max(1, round(30 * s / 150)), trace_every=max(1, round(5 * s / 150)),
                      independent=True, spawn_t0=_scaled([40], s, 150),
                      description=f"a first look: small CNN on 2,000 synthetic images, {s} SGD steps with lr /10 at "
                                  f"50% and 75%, one seed, small grids")
    if name in ("cpu-basins", "cpu-basins-constant"):
        s = _steps(steps, 2000)
        const = name.endswith("constant")
        return Preset(name, model or "cnn", s, 10_000, log_schedule(s, 24), 50, _scaled(_BASIN_T0, s, 2000),
                      _scaled(_BASIN_T1, s, 2000), 1000, alphas=7, schedule="constant" if const else "multistep",
                      window=max(1, round(100 * s / 2000)), trace_every=max(1, round(10 * s / 2000)),
                      seeds=[0, 1, 2], independent=True, spawn_t0=_scaled(_BASIN_SPAWN, s, 2000),
                      description=f"which basin the twins end in: {model or 'cnn'} on 10,000 CIFAR-10 images, {s} "
                                  f"SGD steps " + ("at a constant learning rate" if const else
                                                   "with lr /10 at 50% and 75%")
                                  + ", twins read at t1 up to the end, independent and spawn references")
    if name == "gpu-fig3":
        m = model or "resnet20"
        s = _steps(steps, _FIG3_STEPS)
        t0 = _FIG3_T0.get(m, _FIG3_T0["resnet20"])
        return Preset(name, m, s, None, log_schedule(s, 40), 100, [t for t in _scaled(t0, s, _FIG3_STEPS)],
                      _scaled(_FIG3_T1, s, _FIG3_STEPS), 10_000, schedule="multistep",
                      window=max(1, round(2000 * s / _FIG3_STEPS)), trace_every=max(1, round(50 * s / _FIG3_STEPS)),
                      seeds=[0, 1, 2], independent=True, spawn_t0=_scaled([0, 500, 2000], s, _FIG3_STEPS), gpu=True,
                      description=f"the paper's Figure 3: {m} on full CIFAR-10, 160 epochs ({s} steps) with lr /10 "
                                  f"at 50% and 75%, t1 to the end of training, independent and spawn references")
    if name == "cpu-small":
        s = _steps(steps, 1000)
        return Preset(name, model or "cnn", s, 10_000, log_schedule(s, 24), 50,
                      _scaled([0, 4, 8, 15, 30, 60, 110, 200], s, 1000), _scaled([20, 40, 75, 140, 220, 300], s, 1000),
                      400, alphas=7, window=max(1, round(100 * s / 1000)), trace_every=max(1, round(5 * s / 1000)),
                      seeds=[0, 1, 2], description=f"in-basin sensitivity: small CNN on 10,000 training images, {s} "
                                                   f"SGD steps at a constant learning rate, t1 <= {round(0.3 * s)}")
    if name == "gpu-paper":
        s = _steps(steps, 62_400)
        return Preset(name, model or "resnet20", s, None, log_schedule(s, 40), 100,
                      _scaled([0, 10, 30, 100, 300, 1000, 3000, 10_000], s, 62_400),
                      _scaled([300, 1000, 3000, 10_000, 20_000, 30_000], s, 62_400), 2000,
                      schedule="multistep", window=max(1, round(2000 * s / 62_400)),
                      trace_every=max(1, round(50 * s / 62_400)), seeds=[0, 1, 2],
                      description="the paper's training recipe with a chaos grid inside the first lr stage")
    raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")


def plan(p: Preset, *, seeds: list[int], t0: list[int], t1: list[int], spawn_t0: list[int], independent: bool,
         checkpoints: list[int], probe: int, eval_n: int, alphas: int, bn_recompute: bool) -> dict:
    """The work of a study, per seed, in SGD steps of one member at the preset's batch size."""
    end = max(t1)
    starts = [t0[0]] + [t for t in t0 if t <= end] + ([0] if independent else []) + [t for t in spawn_t0 if t <= end]
    member_steps = end + sum(end - t for t in starts)   # the base, then every spawned member
    members = len(starts)
    # One forward pass costs about a third of an SGD step per image; each (t1, member) evaluates the
    # loss barrier on train and test (alphas points each, twice with BatchNorm recomputed), the
    # disagreement and the dissimilarity.
    per_eval_images = eval_n * (2 * alphas * (2 if bn_recompute else 1) + 2)
    evals = sum(1 for t in t1 for s in starts if s <= t)
    eval_steps = evals * per_eval_images / (3 * p.batch_size)
    # eNTK of every checkpoint: one backward pass per probe image and class (10) in per-sample form.
    ntk_steps = len(checkpoints) * probe * 10 / p.batch_size * 3
    per_seed = p.steps + member_steps + eval_steps + ntk_steps
    return {"members": members, "train_steps": p.steps, "chaos_member_steps": member_steps,
            "eval_step_equivalents": round(eval_steps), "ntk_step_equivalents": round(ntk_steps),
            "per_seed_step_equivalents": round(per_seed), "seeds": len(seeds),
            "total_step_equivalents": round(per_seed * len(seeds))}


def measure_step_seconds(model: str, batch_size: int, device: torch.device, *, steps: int = 3) -> float:
    """Seconds per SGD step of ``model`` at ``batch_size`` on ``device`` now (one warm-up step first)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model(model).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch_size, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch_size,), device=device)
    t = 0.0
    for i in range(steps + 1):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / steps


def project_seconds(work: dict, step_seconds: float) -> float:
    return work["total_step_equivalents"] * step_seconds


def describe_plan(p: Preset, work: dict, *, seconds: float, rate_note: str) -> list[str]:
    """The lines a preset prints before it starts."""
    h = seconds / 3600
    when = f"{seconds / 60:.0f} minutes" if h < 2 else f"{h:.1f} hours"
    return [f"plan ({p.name}): {p.description}",
            f"  per seed: {work['train_steps']} training steps, {work['members']} chaos members "
            f"({work['chaos_member_steps']} member-steps), ~{work['eval_step_equivalents']} step-equivalents of "
            f"metric evaluation, ~{work['ntk_step_equivalents']} of eNTKs; {work['seeds']} seed(s)",
            f"  projected time: about {when} ({rate_note}; within a factor of 2: other jobs on the machine, "
            f"and evaluation and eNTK costs are estimated)"]
