"""Metrics that compare two network states θ (base) and θ' (twin) of one architecture.

A *state* is a ``dict[str, Tensor]`` as returned by ``model.state_dict()``: trainable
parameters and buffers (BatchNorm ``running_mean``/``running_var``/``num_batches_tracked``).
The ``model`` argument is only a template: its ``named_parameters`` say which entries are
parameters, its ``state_dict`` which keys and shapes a state must have. It is never
modified (the functions work on a private copy), and neither are the states.

* :func:`param_dissimilarity` — 1 − cos(θ, θ'), ‖θ − θ'‖ and ‖θ − θ'‖/‖θ‖ over the
  flattened trainable parameters, in float64. The dissimilarity is computed as
  ½‖θ/‖θ‖ − θ'/‖θ'‖‖², which equals 1 − cos exactly in real arithmetic but keeps its
  relative precision for nearly parallel states (a twin run perturbed by 1e-7 has
  1 − cos ≈ 1e-14, which the textbook formula would round to noise) and is exactly 0.0
  for identical states (the "control member" noise floor).
* :func:`loss_barrier` — the linear-mode-connectivity barrier along θ_α = (1−α)θ + αθ'
  (Frankle et al. 2020): max_α [L(θ_α) − ((1−α)L(θ) + αL(θ'))]. All α points are
  evaluated in one batched pass (``torch.func.vmap`` of ``functional_call`` over the
  stacked interpolated parameter and buffer sets); :func:`loss_barrier_reference` is the
  plain loop over α with ``load_state_dict`` that it is tested against.
* :func:`disagreement` — fraction of inputs on which the two models' argmax predictions
  differ, and each model's accuracy.

Everything runs on the device of the states (inputs are moved there batch by batch),
under ``torch.no_grad``, in eval mode (BatchNorm uses running statistics). Every error
on bad input is a one-line :class:`~engine.errors.ConfigError` raised before any work.

By concern: this module (parameters and predictions), :mod:`.barrier` (the loss barrier and its
reference) and :mod:`.states` (the checks of states and inputs every metric shares).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from .barrier import BN_MODES, loss_barrier, loss_barrier_reference
from .states import State, batches, check_batch_size, check_data, check_label_range, check_pair

__all__ = [
    "BN_MODES",
    "disagreement",
    "loss_barrier",
    "loss_barrier_reference",
    "param_dissimilarity",
]


def param_dissimilarity(model: nn.Module, state_a: State, state_b: State) -> dict[str, float]:
    """Compare the trainable parameters of two states (buffers are ignored).

    Over θ, θ' = the flattened concatenation of ``model.named_parameters()`` entries
    (float64): ``dissimilarity`` = 1 − cos(θ, θ') (0 parallel, 1 orthogonal, 2 opposite),
    ``l2`` = ‖θ − θ'‖₂, ``rel_l2`` = ‖θ − θ'‖ / ‖θ‖. All three are exactly 0.0 for
    identical states.
    """
    pair = check_pair(model, state_a, state_b)
    a = torch.cat([pair.a[k].double().reshape(-1) for k in pair.params])
    b = torch.cat([pair.b[k].double().reshape(-1) for k in pair.params])
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    for label, norm in (("state_a", na), ("state_b", nb)):
        if float(norm) == 0.0:
            raise ConfigError(f"{label} has all-zero parameters; the cosine is undefined")
    l2 = torch.linalg.vector_norm(a - b)
    # ½‖â − b̂‖² = 1 − cos for unit vectors, without cancellation when cos ≈ 1.
    dis = 0.5 * torch.linalg.vector_norm(a / na - b / nb) ** 2
    return {"dissimilarity": float(dis), "l2": float(l2), "rel_l2": float(l2 / na)}


def disagreement(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 500,
) -> dict[str, float]:
    """Prediction disagreement of two states on ``(x, y)`` (eval mode).

    ``disagreement`` = fraction of inputs whose argmax predictions differ; ``acc_a``,
    ``acc_b`` = each model's accuracy. Two ordinary passes (``functional_call`` with each
    state), so the predictions are those of the model itself.
    """
    pair = check_pair(model, state_a, state_b)
    x, y = check_data(x, y)
    batch_size = check_batch_size(batch_size)
    net = copy.deepcopy(model).eval()
    differ = torch.zeros((), dtype=torch.int64, device=pair.device)
    correct_a = torch.zeros((), dtype=torch.int64, device=pair.device)
    correct_b = torch.zeros((), dtype=torch.int64, device=pair.device)
    y_max = int(y.max())
    start = 0
    with torch.no_grad():
        for xb in batches(x, batch_size, pair.device, pair.dtype):
            yb = y[start : start + len(xb)].to(pair.device, torch.int64, non_blocking=True)
            start += len(xb)
            logits_a = functional_call(net, pair.a, (xb,))
            logits_b = functional_call(net, pair.b, (xb,))
            check_label_range(y_max, logits_a.shape[-1])
            pa, pb = logits_a.argmax(-1), logits_b.argmax(-1)
            differ += (pa != pb).sum()
            correct_a += (pa == yb).sum()
            correct_b += (pb == yb).sum()
    n = len(x)
    return {
        "disagreement": int(differ) / n,
        "acc_a": int(correct_a) / n,
        "acc_b": int(correct_b) / n,
    }
