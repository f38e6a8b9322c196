"""The loss barrier on the straight line between two states (Frankle et al. 2020):
:func:`loss_barrier`, all α points in one batched pass (``torch.func.vmap`` of ``functional_call``
over the stacked interpolated parameter and buffer sets), and :func:`loss_barrier_reference`, the
plain loop over α with ``load_state_dict`` that it is tested against."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..errors import ConfigError
from ..models import running_stat_layers
from .states import Pair, State, batches, check_batch_size, check_data, check_inputs, check_label_range, check_pair

__all__ = ["BN_MODES", "loss_barrier", "loss_barrier_reference"]

BN_MODES: tuple[str, ...] = ("interpolate", "recompute")


def _check_alphas(alphas: Any) -> list[float]:
    if isinstance(alphas, bool):
        raise ConfigError(f"alphas must be a number of grid points (>= 2) or a sequence of values, got {alphas!r}")
    if isinstance(alphas, int):
        if alphas < 2:
            raise ConfigError(f"alphas must be at least 2 grid points (both endpoints), got {alphas}")
        return [i / (alphas - 1) for i in range(alphas)]  # correctly rounded, exact endpoints
    try:
        values = torch.as_tensor(alphas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"alphas must be an int or a 1-D sequence of numbers in [0, 1], got {alphas!r}") from None
    if values.ndim != 1 or values.numel() == 0:
        raise ConfigError(f"alphas must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    bad = ~((values >= 0) & (values <= 1))  # also catches NaN
    if bool(bad.any()):
        raise ConfigError(f"alphas must lie in [0, 1]; got {values[bad][0].item()!r}")
    return values.tolist()


def _check_bn(bn: Any, bn_data: Any) -> Tensor | None:
    if bn not in BN_MODES:
        raise ConfigError(f"bn must be one of {', '.join(BN_MODES)}; got {bn!r}")
    if bn == "recompute":
        if bn_data is None:
            raise ConfigError('bn="recompute" needs bn_data: inputs on which to re-estimate BatchNorm statistics')
        bn_data = check_inputs("bn_data", bn_data)
        if not bn_data.is_floating_point():
            raise ConfigError(f"bn_data must be float model inputs, got {bn_data.dtype}")
        return bn_data
    return None


def _bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that keep running statistics (:func:`engine.models.running_stat_layers`), with their
    name prefixes in the state dict."""
    return [(f"{name}." if name else "", m) for name, m in running_stat_layers(model)]


def _lerp(ta: Tensor, tb: Tensor, alpha: float) -> Tensor:
    """(1−α)·ta + α·tb in float64, rounded to the input dtype.

    ``torch.lerp`` (ta + α·(tb − ta) below α = ½, tb − (tb − ta)·(1 − α) above) is exact at
    α = 0 and α = 1 and gives ``ta``'s bits at every α when the two are equal.
    """
    if not ta.is_floating_point():
        return ta.clone()  # num_batches_tracked: state_a's (a copy, callers may write it)
    return torch.lerp(ta.double(), tb.double(), alpha).to(ta.dtype)


def _interpolated_state(pair: Pair, alpha: float) -> dict[str, Tensor]:
    return {k: _lerp(pair.a[k], pair.b[k], alpha) for k in pair.keys}


def _eval_alphas(alphas: list[float]) -> tuple[list[float], int, int]:
    """The α values to evaluate: the grid plus any missing endpoint; indices of 0 and 1."""
    values = list(alphas)
    for end in (0.0, 1.0):
        if end not in values:
            values.append(end)
    return values, values.index(0.0), values.index(1.0)


def _ce_sums(logits: Tensor, yb: Tensor) -> Tensor:
    """Per-model summed cross-entropy of ``logits`` (..., B, C) in float64 -> (...)."""
    lead, (bsz, c) = logits.shape[:-2], logits.shape[-2:]
    flat = logits.double().reshape(-1, c)
    targets = yb.expand(*lead, bsz).reshape(-1)
    return F.cross_entropy(flat, targets, reduction="none").view(*lead, bsz).sum(-1)


def _err_sums(logits: Tensor, yb: Tensor) -> Tensor:
    """Per-model count of misclassified inputs of ``logits`` (..., B, C) as float64 -> (...)."""
    return (logits.argmax(-1) != yb).sum(-1).double()


def _barrier_result(alphas: list[float], losses: list[float], i0: int, i1: int,
                    errors: list[float] | None = None) -> dict[str, Any]:
    out = _gap(alphas, losses, i0, i1)
    if errors is not None:
        e = _gap(alphas, errors, i0, i1)
        out.update({"error_barrier": e["barrier"], "error_alpha_max": e["alpha_max"], "errors": e["losses"],
                    "error_a": e["loss_a"], "error_b": e["loss_b"]})
    return out


def _gap(alphas: list[float], losses: list[float], i0: int, i1: int) -> dict[str, Any]:
    la, lb = losses[i0], losses[i1]
    n = len(alphas)
    # torch.lerp's form of the chord: exactly la at α = 0, lb at α = 1, and la everywhere
    # when la == lb, so identical endpoints give gaps of exactly 0.
    chord = torch.lerp(torch.full((n,), la, dtype=torch.float64), torch.full((n,), lb, dtype=torch.float64),
                       torch.tensor(alphas, dtype=torch.float64))
    gaps = torch.tensor(losses[:n], dtype=torch.float64) - chord
    i = int(torch.argmax(gaps))
    return {
        "barrier": float(gaps[i]),
        "alpha_max": float(alphas[i]),
        "alphas": [float(a) for a in alphas],
        "losses": [float(v) for v in losses[:n]],
        "loss_a": float(la),
        "loss_b": float(lb),
    }


def _prepare_barrier(model, state_a, state_b, x, y, alphas, bn, batch_size, bn_data):
    pair = check_pair(model, state_a, state_b)
    x, y = check_data(x, y)
    alpha_list = _check_alphas(alphas)
    bn_data = _check_bn(bn, bn_data)
    batch_size = check_batch_size(batch_size)
    return pair, x, y, alpha_list, bn_data, batch_size


def loss_barrier(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: Tensor,
    y: Tensor,
    *,
    alphas: int | Sequence[float] = 11,
    bn: str = "interpolate",
    batch_size: int = 500,
    bn_data: Tensor | None = None,
) -> dict[str, Any]:
    """Loss barrier on the straight line between two states.

    For α on ``alphas`` (a number of uniform grid points in [0, 1], or explicit values),
    θ_α = (1−α)θ + αθ' and L = mean cross-entropy on ``(x, y)`` in eval mode; returns
    ``barrier`` = max_α [L(θ_α) − ((1−α)L(θ) + αL(θ'))], ``alpha_max`` (its α), ``alphas``,
    ``losses`` (L per α), ``loss_a`` = L(θ), ``loss_b`` = L(θ'); the same for the test error
    (fraction of misclassified inputs, argmax): ``error_barrier``, ``error_alpha_max``,
    ``errors``, ``error_a``, ``error_b`` (Frankle et al.'s instability is the error barrier). With a grid containing an
    endpoint the barrier is ≥ 0 (exactly 0 when the path is convex); the endpoints are
    evaluated even when not on the grid. Identical states give a barrier of exactly 0.

    BatchNorm: ``bn="interpolate"`` interpolates ``running_mean``/``running_var`` like the
    parameters (``num_batches_tracked`` from ``state_a``); ``bn="recompute"`` re-estimates
    every θ_α's running statistics on ``bn_data`` (train-mode forward passes in batches of
    ``batch_size``, cumulative average as with ``momentum=None``), then evaluates. In that
    mode ``loss_a``/``loss_b`` use re-estimated statistics too.

    All α points are evaluated together: the A interpolated parameter/buffer sets are
    stacked and the model runs under ``vmap(functional_call)``, so memory grows with
    A × ``batch_size`` inputs; lower ``batch_size`` for large models.
    """
    pair, x, y, alpha_list, bn_data, batch_size = _prepare_barrier(
        model, state_a, state_b, x, y, alphas, bn, batch_size, bn_data
    )
    evals, i0, i1 = _eval_alphas(alpha_list)
    n_alpha = len(evals)
    param_keys = set(pair.params)
    stacked = {k: torch.stack([_lerp(pair.a[k], pair.b[k], a) for a in evals]) for k in pair.keys}
    params = {k: v for k, v in stacked.items() if k in param_keys}
    buffers = {k: v for k, v in stacked.items() if k not in param_keys}

    net = copy.deepcopy(model)

    def forward(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(net, (p, b), (xb,))

    batched = vmap(forward, in_dims=(0, 0, None))
    with torch.no_grad():
        if bn_data is not None:
            bns = _bn_modules(net)
            for prefix, _ in bns:
                buffers[prefix + "running_mean"].zero_()
                buffers[prefix + "running_var"].fill_(1.0)
                if prefix + "num_batches_tracked" in buffers:
                    buffers[prefix + "num_batches_tracked"].zero_()
            net.train()
            for k, xb in enumerate(batches(bn_data, batch_size, pair.device, pair.dtype), start=1):
                # momentum=None's cumulative average: factor 1/k at the k-th batch. Set as a
                # number because BatchNorm would read 1/num_batches_tracked with float(),
                # which a vmapped (per-α) buffer does not allow; it is the same for every α.
                for _, m in bns:
                    m.momentum = 1.0 / k
                batched(params, buffers, xb)
        net.eval()
        sums = torch.zeros(n_alpha, dtype=torch.float64, device=pair.device)
        errs = torch.zeros(n_alpha, dtype=torch.float64, device=pair.device)
        y_max = int(y.max())
        start = 0
        for xb in batches(x, batch_size, pair.device, pair.dtype):
            yb = y[start : start + len(xb)].to(pair.device, torch.int64, non_blocking=True)
            start += len(xb)
            logits = batched(params, buffers, xb)
            if start == len(xb):
                check_label_range(y_max, logits.shape[-1])
            sums += _ce_sums(logits, yb)
            errs += _err_sums(logits, yb)
    losses = (sums / len(x)).tolist()
    return _barrier_result(alpha_list, losses, i0, i1, (errs / len(x)).tolist())


def loss_barrier_reference(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: Tensor,
    y: Tensor,
    *,
    alphas: int | Sequence[float] = 11,
    bn: str = "interpolate",
    batch_size: int = 500,
    bn_data: Tensor | None = None,
) -> dict[str, Any]:
    """:func:`loss_barrier` as a plain loop over α (the test oracle; same arguments and result).

    Each θ_α is loaded into one copy of the model with ``load_state_dict`` and evaluated
    with an ordinary forward pass; ``bn="recompute"`` uses the modules' own
    ``reset_running_stats`` and ``momentum=None``.
    """
    pair, x, y, alpha_list, bn_data, batch_size = _prepare_barrier(
        model, state_a, state_b, x, y, alphas, bn, batch_size, bn_data
    )
    evals, i0, i1 = _eval_alphas(alpha_list)
    net = copy.deepcopy(model)
    losses, errors = [], []
    y_max = int(y.max())
    with torch.no_grad():
        for alpha in evals:
            # assign=True takes the state's tensors (device and dtype) as they are.
            net.load_state_dict(_interpolated_state(pair, alpha), assign=True)
            if bn_data is not None:
                for _, m in _bn_modules(net):
                    m.reset_running_stats()
                    m.momentum = None
                net.train()
                for xb in batches(bn_data, batch_size, pair.device, pair.dtype):
                    net(xb)
            net.eval()
            total = torch.zeros((), dtype=torch.float64, device=pair.device)
            wrong = torch.zeros((), dtype=torch.float64, device=pair.device)
            start = 0
            for xb in batches(x, batch_size, pair.device, pair.dtype):
                yb = y[start : start + len(xb)].to(pair.device, torch.int64)
                start += len(xb)
                logits = net(xb)
                check_label_range(y_max, logits.shape[-1])
                total += _ce_sums(logits, yb)
                wrong += _err_sums(logits, yb)
            losses.append(float(total) / len(x))
            errors.append(float(wrong) / len(x))
    return _barrier_result(alpha_list, losses, i0, i1, errors)
