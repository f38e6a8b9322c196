"""Twin-run fleets: lockstep training with identical SGD noise and perturbation injection."""

from .chaos import FIELDS, ChaosConfig, ChaosResult, ChaosStore, chaos_grid, load_chaos, run_chaos, write_summary
from .fleet import Fleet, LoopFleet, MemberSpec, Strategy, VmapFleet, make_fleet, resolve_strategy
from .perturb import NORMS, Perturbation, ZeroPerturbationError, perturb_, perturb_model_

__all__ = [
    "FIELDS",
    "NORMS",
    "ChaosConfig",
    "ChaosResult",
    "ChaosStore",
    "Fleet",
    "LoopFleet",
    "MemberSpec",
    "Perturbation",
    "Strategy",
    "VmapFleet",
    "ZeroPerturbationError",
    "chaos_grid",
    "load_chaos",
    "make_fleet",
    "perturb_",
    "perturb_model_",
    "resolve_strategy",
    "run_chaos",
    "write_summary",
]
