"""Twin-run fleets: lockstep training with identical SGD noise and perturbation injection.

The chaos-grid job built on them lives in :mod:`engine.jobs.chaos`."""

from .fleet import Fleet, LoopFleet, MemberSpec, Strategy, VmapFleet, make_fleet, resolve_strategy
from .perturb import NORMS, Perturbation, ZeroPerturbationError, perturb_, perturb_model_

__all__ = [
    "NORMS",
    "Fleet",
    "LoopFleet",
    "MemberSpec",
    "Perturbation",
    "Strategy",
    "VmapFleet",
    "ZeroPerturbationError",
    "make_fleet",
    "perturb_",
    "perturb_model_",
    "resolve_strategy",
]
