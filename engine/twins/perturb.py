"""Seeded parameter perturbations, with the realized size measured after rounding."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ConfigError, EngineError

NORMS = ("l2", "linf", "gaussian", "relative")


class ZeroPerturbationError(EngineError, RuntimeError):
    """The requested perturbation vanished when rounded to the parameters' dtype."""


@dataclass(frozen=True)
class Perturbation:
    """A random direction scaled to ``eps`` under ``norm``.

    * ``l2``: ‖δ‖₂ = eps over all selected coordinates (the paper's "size");
    * ``linf``: every coordinate ±eps (so ‖δ‖∞ = eps);
    * ``gaussian``: every coordinate N(0, eps²);
    * ``relative``: ‖δ‖₂ = eps · ‖θ‖₂.

    ``weights_only`` restricts δ to conv/linear weights (no biases, no normalization
    parameters). ``eps = 0`` is the control member.
    """

    eps: float
    norm: str = "l2"
    seed: int = 0
    weights_only: bool = False

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ConfigError(f"perturbation norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ConfigError(f"perturbation size must be finite and >= 0, got {self.eps}")

    def to_dict(self) -> dict:
        return asdict(self)


def _selected(model: nn.Module, weights_only: bool) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if weights_only and p.ndim < 2:  # biases and BatchNorm affine parameters are 1-D
            continue
        out.append((name, p))
    return out


def direction(shapes: list[torch.Size], seed: int) -> list[torch.Tensor]:
    """A seeded standard-normal direction, float64 on the CPU (same on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@torch.no_grad()
def perturb_(params: list[tuple[str, torch.Tensor]], pert: Perturbation) -> dict:
    """Add the perturbation in place to ``params`` ``[(name, tensor)]``; return its sizes.

    The realized perturbation is measured from the stored values after rounding to
    the parameter dtype: ``realized_l2 = ‖θ' − θ‖₂``, ``realized_linf``, the number of
    coordinates that actually changed (``changed`` of ``coords``), and how many of the non-zero
    (trained) ones did (``changed_nonzero`` of ``nonzero``): a perturbation that lands only on
    exactly-zero parameters is lost in the first step.
    """
    info = {"requested": pert.eps, "norm": pert.norm, "realized_l2": 0.0, "realized_linf": 0.0,
            "changed": 0, "coords": sum(p.numel() for _, p in params),
            "changed_nonzero": 0, "nonzero": sum(int((p != 0).sum()) for _, p in params)}
    if pert.eps == 0 or not params:
        return info
    d = direction([p.shape for _, p in params], pert.seed)
    dnorm = math.sqrt(sum(float((x * x).sum()) for x in d))
    if pert.norm == "l2":
        scale = pert.eps / dnorm
        d = [x * scale for x in d]
    elif pert.norm == "relative":
        tnorm = math.sqrt(sum(float((p.double() ** 2).sum()) for _, p in params))
        d = [x * (pert.eps * tnorm / dnorm) for x in d]
    elif pert.norm == "linf":
        d = [torch.sign(x) * pert.eps for x in d]
    else:  # gaussian
        d = [x * pert.eps for x in d]
    sq, mx, changed, changed_nz = 0.0, 0.0, 0, 0
    for (_, p), delta in zip(params, d, strict=True):
        old = p.detach().clone()
        p.copy_((p.double() + delta.to(p.device)).to(p.dtype))
        diff = (p.double() - old.double())
        sq += float((diff * diff).sum())
        mx = max(mx, float(diff.abs().max()))
        changed += int((diff != 0).sum())
        changed_nz += int(((diff != 0) & (old != 0)).sum())
    info.update(realized_l2=math.sqrt(sq), realized_linf=mx, changed=changed, changed_nonzero=changed_nz)
    return info


def perturb_model_(model: nn.Module, pert: Perturbation) -> dict:
    """:func:`perturb_` on a module's (selected) trainable parameters."""
    return perturb_(_selected(model, pert.weights_only), pert)
