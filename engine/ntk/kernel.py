"""One-call eNTKs: in memory, by parameter groups (no store), or through a Jacobian store.

Three ways to get H = J Jᵀ, chosen by size:

* in memory: the whole ``(N·C, P)`` Jacobian fits the budget → one Jacobian, one Gram;
* parameter groups (``no-store``): H = Σ_g J_g J_gᵀ over groups of parameters whose
  columns fit the budget; never more than one group's columns are held;
* stored: :func:`jacobian_to_store` streams row blocks into a memory-mapped HDF5 file
  (resumable), then :func:`~engine.ntk.gram.gram` reads it out of core.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ConfigError
from ..progress import progress as progress_bar
from ..store import JacobianStore
from .gram import KernelKind, _kind, gram
from .jacobian import jacobian, parameter_layout

DEFAULT_BUDGET = 2 << 30  # bytes of Jacobian held at once


def probe_hash(x: torch.Tensor) -> str:
    """A short content hash of a probe set (dtype, shape and bytes)."""
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def num_outputs(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """C: the output width of ``model`` on one input (eval mode, no grad)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs[:1].to(_device_of(model)))
    finally:
        model.train(was)
    if out.ndim != 2:
        raise ConfigError(f"model output must be (N, C) logits, got shape {tuple(out.shape)}")
    return int(out.shape[1])


def param_groups(model: torch.nn.Module, *, rows: int, budget_bytes: int,
                 itemsize: int = 4) -> list[list[str]]:
    """Consecutive parameters grouped so that ``rows × group columns × itemsize`` fits the budget.

    A single parameter larger than the budget gets a group of its own; the caller
    decides whether that is acceptable.
    """
    max_cols = max(1, budget_bytes // max(rows * itemsize, 1))
    groups: list[list[str]] = []
    cols = 0
    for name, shape, _, _ in parameter_layout(model):
        n = math.prod(shape)
        if not groups or cols + n > max_cols:
            groups.append([])
            cols = 0
        groups[-1].append(name)
        cols += n
    return groups


def entk(model: torch.nn.Module, inputs: torch.Tensor, *, kernel: str | KernelKind = "full",
         projection: torch.Tensor | None = None, backend: str = "auto",
         dtype: torch.dtype = torch.float32, budget_bytes: int = DEFAULT_BUDGET,
         ops_backend: str = "auto", force_eval: bool = False, progress: bool | None = False) -> torch.Tensor:
    """The empirical NTK of ``model`` on ``inputs`` ``(N, ...)``.

    Returns ``(N·C, N·C)`` with row ``n·C + c`` (``kernel="full"``), ``(N, N)``
    summed over outputs (``kernel="traced"``), or ``(N, N)`` for the single output
    ``projection · f`` when a ``(C,)`` ``projection`` is given. Accumulates in
    ``dtype`` (float32 or float64) on the model's device. When the Jacobian does
    not fit ``budget_bytes`` the kernel is accumulated over parameter groups.
    ``backend`` picks the Jacobian backend, ``ops_backend`` the Gram tiles' (see :func:`gram`).
    """
    kind = _kind(kernel)
    if model.training and not force_eval:
        raise ConfigError(f"{type(model).__name__} is in train mode; BatchNorm must use running statistics: "
                          "call model.eval() or pass force_eval=True")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or not inputs.is_floating_point():
        raise ConfigError("inputs must be a floating tensor (N, ...) of probe inputs")
    dev = _device_of(model)
    inputs = inputs.to(dev)
    c = 1 if projection is not None else num_outputs(model, inputs)
    if projection is not None and kind is KernelKind.TRACED:
        raise ConfigError("a projection already gives one output: use kernel='full' (N×N)")
    rows = inputs.shape[0] * c
    groups = param_groups(model, rows=rows, budget_bytes=budget_bytes)
    # J in the model's own precision (a float64 model gives a float64 Jacobian).
    jdtype = next(model.parameters()).dtype
    common = {"backend": backend, "projection": projection, "force_eval": force_eval, "dtype": jdtype}
    if len(groups) == 1:
        J = jacobian(model, inputs, **common)
        return gram(J, kernel=kind, num_outputs=c, dtype=dtype, device=dev, budget_bytes=budget_bytes,
                    backend=ops_backend)
    m = inputs.shape[0] if kind is KernelKind.TRACED else rows
    h = torch.zeros(m, m, dtype=dtype, device=dev)
    for g in progress_bar(groups, desc="eNTK parameter groups", enabled=progress, unit="group"):
        J = jacobian(model, inputs, param_names=g, **common)
        gram(J, kernel=kind, num_outputs=c, dtype=dtype, device=dev, out=h, accumulate=True,
             budget_bytes=budget_bytes, backend=ops_backend)
        del J
    return h


def _first_bad_column(block: torch.Tensor) -> tuple[int, int] | None:
    bad = ~torch.isfinite(block)
    if not bad.any():
        return None
    r, col = bad.nonzero()[0].tolist()
    return r, col


def jacobian_to_store(model: torch.nn.Module, inputs: torch.Tensor, path: str | Path, *,
                      block_inputs: int | None = None, dtype: torch.dtype = torch.float32,
                      backend: str = "auto", job: Mapping | None = None,
                      budget_bytes: int = DEFAULT_BUDGET, overwrite: bool = False,
                      force_eval: bool = False, progress: bool | None = False) -> JacobianStore:
    """Stream the Jacobian of ``model`` on ``inputs`` into an HDF5 file, block by block.

    Rerunning the same call after an interruption resumes at the first incomplete
    block; the result is bit-identical to an uninterrupted run (each block depends
    only on the model and its inputs). Memory is bounded by ``block_inputs``
    (default: as many inputs as fit ``budget_bytes``).
    """
    if model.training and not force_eval:
        raise ConfigError(f"{type(model).__name__} is in train mode; BatchNorm must use running statistics: "
                          "call model.eval() or pass force_eval=True")
    dev = _device_of(model)
    inputs = inputs.to(dev)
    c = num_outputs(model, inputs)
    layout = parameter_layout(model)
    p = layout[-1][3] if layout else 0
    if block_inputs is None:
        block_inputs = max(1, min(inputs.shape[0], budget_bytes // max(c * p * 4, 1)))
    spec = {"model": getattr(model, "arch", type(model).__name__), "mode": "eval",
            "probe_hash": probe_hash(inputs), "backend": str(backend),
            "params": [[n, list(s)] for n, s, _, _ in layout], **(job or {})}
    store = JacobianStore.create_for(path, job=spec, n_inputs=inputs.shape[0], num_outputs=c,
                                     n_params=p, block_inputs=block_inputs, dtype=dtype,
                                     overwrite=overwrite)
    todo = [u for u, done in enumerate(store.complete) if not done]
    with store.writer() as w:
        for u in progress_bar(todo, desc="Jacobian blocks", enabled=progress, unit="block"):
            s, e = store.unit_inputs(u)
            block = jacobian(model, inputs[s:e], backend=backend, force_eval=force_eval)
            bad = _first_bad_column(block)
            if bad is not None:
                r, col = bad
                name = next(n for n, _, c0, c1 in layout if c0 <= col < c1)
                raise ConfigError(f"non-finite Jacobian in block {u} (input {s + r // c}, output {r % c}) "
                                  f"for parameter {name}; nothing of this block was stored")
            w.write("jacobian", s * c, block.to(dtype))
            w.mark_complete(u)
    return store

