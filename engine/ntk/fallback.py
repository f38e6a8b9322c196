"""The torch.func fallback: per-sample Jacobian columns of any parameters, for every parameter
without a layer rule (or used where a rule cannot see it), and for ``implementation="reference"``.
The one copy every front end uses (``jacobian``, ``entk``, ``entk_fn``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from .params import Entry

__all__ = ["fill_columns", "model_function", "per_sample_jacobian"]


def per_sample_jacobian(single: Callable, params: dict[str, Tensor], x: object, k: int,
                        scalar: bool) -> dict[str, Tensor]:
    """{name: (n, k, numel)} per-sample Jacobians of ``single(params, x_n)`` over the n samples of ``x``
    (a tensor or a tuple of tensors batched on dim 0): ``single`` returns k outputs, or one scalar
    when ``scalar`` (then k = 1)."""
    if scalar:
        jac = vmap(grad(single), in_dims=(None, 0))(params, x)
    else:
        try:
            jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
        except RuntimeError:
            # Nested vmap (samples x outputs) trips over a few batching rules (torch 2.14:
            # PReLU's backward raises a shape error); one vmap level per output works.
            cols = [vmap(grad(lambda p, x1, j=j: single(p, x1)[j]), in_dims=(None, 0))(params, x)
                    for j in range(k)]
            jac = {name: torch.stack([col[name] for col in cols], dim=1) for name in params}
    return {name: t.reshape(t.shape[0], k, -1) for name, t in jac.items()}


def model_function(model: nn.Module, v: Tensor | None) -> Callable:
    """``single(params, xs)``: the model's outputs (or v·outputs) on one sample, ``xs`` a tuple of its
    input tensors; the parameters not in ``params`` and the buffers stay the module's own."""
    def single(p: dict[str, Tensor], xs: tuple[Tensor, ...]) -> Tensor:
        y = functional_call(model, p, tuple(t.unsqueeze(0) for t in xs))[0]
        return y if v is None else y @ v

    return single


def fill_columns(model: nn.Module, entries: Sequence[Entry], xs: tuple[Tensor, ...], dest: Tensor,
                 v: Tensor | None, cols: Sequence[tuple[int, int]]) -> None:
    """Write the columns of ``entries`` at the rows ``xs`` into ``dest`` (n, K, width), entry i at
    ``dest[:, :, cols[i][0]:cols[i][1]]``."""
    params = {e.name: e.param.detach() for e in entries}
    # no_grad only outside the transforms (they ignore it): without it the result
    # would carry a graph back to the unselected parameters.
    with torch.no_grad():
        jac = per_sample_jacobian(model_function(model, v), params, xs, dest.shape[1], v is not None)
        for e, (c0, c1) in zip(entries, cols, strict=True):
            dest[:, :, c0:c1].copy_(jac[e.name])
