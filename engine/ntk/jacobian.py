"""Per-sample parameter Jacobians of a network, the raw material of the eNTK.

For a model f(x; θ) with C outputs and a batch of N inputs, :func:`jacobian` returns
J of shape ``(N·C, P)``: row ``n·C + c`` is ∂f_c(x_n)/∂θ, and the P columns are the
trainable parameters in ``model.named_parameters()`` order, each flattened row-major
(:func:`parameter_layout` gives the column ranges). BatchNorm is evaluated with its
running statistics so that rows of different samples are independent.

Two backends compute the same matrix:

``reference``
    ``torch.func``: ``vmap`` over samples of ``jacrev`` of ``functional_call``, chunked
    over samples. The simplest correct path.
``structured``
    One forward per block of inputs with hooks on the modules that own the selected
    parameters, one backward per output for each module's per-sample output
    gradient, then closed-form per-sample parameter gradients per layer type
    (``engine/ntk/rules/``: Linear, Conv1d/2d, BatchNorm, LayerNorm, GroupNorm,
    Embedding),
    written straight into J's columns. Parameters without a rule (or used in a way
    a rule cannot see) fall back to the reference backend for just their columns;
    :func:`structured_coverage` says which.
``auto``
    The structured backend.

Measurements: benchmarks/results/README.md (``jacobian-<model>`` groups of
``benchmarks/bench_ntk.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, parse_enum
from ..heap import with_freed_memory_reused
from .budget import DEFAULT_BUDGET, check_budget, jacobian_block_bytes, per_sample_bytes
from .capture import Plan, Recorder, make_plan, output_grads
from .fallback import fill_columns
from .kinds import Implementation
from .params import (
    Entry,
    check_chunk,
    check_mode,
    check_out,
    check_projection,
    check_x,
    eval_mode,
    parameter_layout,
    params_dtype_device,
    probe,
    selected_entries,
)

__all__ = ["jacobian", "parameter_layout", "structured_coverage"]

# --------------------------------------------------------------------------- reference


def _reference_into(
    model: nn.Module,
    x: Tensor,
    entries: Sequence[Entry],
    out3: Tensor,
    projection: Tensor | None,
    chunk_size: int,
) -> None:
    """Write the columns of ``entries`` of J (as ``out3``, (N, K, P)) with torch.func."""
    n = x.shape[0]
    cols = [(e.start, e.end) for e in entries]
    for s in range(0, n, chunk_size):
        e_ = min(n, s + chunk_size)
        fill_columns(model, entries, (x[s:e_],), out3[s:e_], projection, cols)


# --------------------------------------------------------------------------- structured


def _structured_block(
    model: nn.Module,
    plan: Plan,
    x: Tensor,
    out3: Tensor,
    projection: Tensor | None,
) -> list[Entry]:
    """Fill the structured columns of one block of rows; returns the entries left to the fallback."""
    rec = Recorder(plan, x.shape[0])
    with rec, torch.enable_grad():
        f = model(x)
    fallback = rec.fallback_ids()
    calls = rec.resolve(fallback)
    written: set[int] = set()
    if calls and f.requires_grad:
        own = [c for c in calls if c.base is None]
        grads = dict(zip(map(id, own), output_grads(f, [c.y for c in own], projection), strict=True))
        del f
        with torch.no_grad():
            for call in calls:
                g = grads[id(call.base or call)]
                if g is None:
                    continue
                key = id(call.module)
                slots = [(attr, e) for attr, e in plan.slots[key] if id(e.param) not in fallback]
                # A parameter already written by an earlier call (reuse, sharing) accumulates.
                acc = any(id(e.param) in written for _, e in slots)
                if acc:
                    for _, e in slots:
                        if id(e.param) not in written:
                            out3[:, :, e.start : e.end].zero_()
                dests = {attr: out3[:, :, e.start : e.end] for attr, e in slots}
                plan.rules[key].compute(call.module, call.a, g, dests, acc, call.scale)
                written.update(id(e.param) for _, e in slots)
            del grads
    with torch.no_grad():
        for e in plan.entries:
            if id(e.param) not in fallback and id(e.param) not in written:
                # Owner never called, or its output does not reach f: zero gradient.
                out3[:, :, e.start : e.end].zero_()
    return [e for e in plan.entries if id(e.param) in fallback]


def _structured_into(
    model: nn.Module,
    plan: Plan,
    x: Tensor,
    out3: Tensor,
    projection: Tensor | None,
    chunk_size: int,
) -> None:
    n = x.shape[0]
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        rows = out3[s:e]
        left = _structured_block(model, plan, x[s:e], rows, projection)
        if left:
            fill_columns(model, left, (x[s:e],), rows, projection, [(c.start, c.end) for c in left])


# --------------------------------------------------------------------------- public


def structured_coverage(
    model: nn.Module, x: Tensor | None = None, *, param_names: str | Iterable[str] | None = None
) -> dict[str, str]:
    """How the structured backend handles each selected parameter: ``"structured"`` or ``"fallback"``.

    Without ``x`` the answer is static (module types and parameter slots). With an
    example batch ``x`` (N, ...) one forward (no backward) also catches dynamic
    reasons: a module called on an unbatched input, a parameter used outside its
    module (tied weights), an in-place op on a hooked module's input or output.
    """
    entries = selected_entries(model, param_names)
    plan = make_plan(model, entries)
    fallback = {id(e.param) for e in entries if id(e.param) not in plan.structured}
    if x is not None:
        dtype, device = params_dtype_device(model, entries)
        x = check_x(x, dtype, device)
        with eval_mode(model):
            rec = Recorder(plan, x.shape[0])
            with rec, torch.no_grad():
                model(x)
            fallback |= rec.fallback_ids()
    return {e.name: "fallback" if id(e.param) in fallback else "structured" for e in entries}


@with_freed_memory_reused
def jacobian(
    model: nn.Module,
    x: Tensor,
    *,
    implementation: Implementation | str = "auto",
    param_names: str | Iterable[str] | None = None,
    projection: Tensor | None = None,
    chunk_size: int | None = None,
    force_eval: bool = False,
    out: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    backend: Implementation | str | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
) -> Tensor:
    """The per-sample parameter Jacobian of ``model`` at the inputs ``x``.

    Args:
        model: returns logits (N, C) for inputs (N, ...); must be in eval mode
            (BatchNorm on running statistics) unless ``force_eval``.
        x: inputs (N, ...), same dtype and device as the model's parameters.
        implementation: ``"auto"`` (= structured), ``"structured"`` or ``"reference"``
            (:class:`~engine.ntk.kinds.Implementation`).
        param_names: restrict the columns to these parameters, one name or an iterable of
            names (kept in model order, see :func:`parameter_layout`); the structured backend then only does
            per-sample work for the layers that own them.
        projection: v of shape (C,): return the Jacobian of the single output
            v·f(x_n) instead, shape (N, P).
        chunk_size: samples per block; default: as many as keep one block's working set
            (:func:`~engine.ntk.budget.per_sample_bytes`: the graph, the output gradients and
            the rules' workspace, or torch.func's per-sample Jacobian for the reference
            backend) within ``budget_bytes``, and within
            :data:`~engine.ntk.budget.JACOBIAN_BLOCK_BYTES`, about the fastest block on a CPU.
        force_eval: switch every module to eval mode for the call and restore each
            module's previous mode afterwards (also on error).
        out: preallocated contiguous result to write into (shape, dtype, device
            checked); every element is written.
        dtype: dtype of the result. The computation runs in the model's dtype.
        backend: deprecated name of ``implementation``.
        budget_bytes: the working memory beyond the result (default
            :data:`~engine.ntk.budget.DEFAULT_BUDGET`); a budget below one sample's working
            set is refused before any work.

    Returns:
        J of shape (N·C, P) with row ``n·C + c`` = ∂f_c(x_n)/∂θ, or (N, P) with a
        projection. Parameters and buffers are left untouched.
    """
    if backend is not None:
        warnings.warn("jacobian(backend=...) is deprecated; use implementation=... (backend= will be removed "
                      "in the next release)", DeprecationWarning, stacklevel=2)
        implementation = backend
    kind = parse_enum(Implementation, implementation, "implementation")
    entries = selected_entries(model, param_names)
    chunk = check_chunk(chunk_size)
    budget = check_budget(budget_bytes)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    check_mode(model, force_eval)
    cdtype, device = params_dtype_device(model, entries)
    x = check_x(x, cdtype, device)
    with eval_mode(model):
        c = probe(model, x)
        v = None if projection is None else check_projection(projection, c, cdtype, device)
        n, k = x.shape[0], (1 if v is not None else c)
        width = entries[-1].end
        result = check_out(out, (n * k, width) if v is None else (n, width), dtype, device)
        out3 = result.view(n, k, width)
        x = x.detach()
        plan = None if kind is Implementation.REFERENCE else make_plan(model, entries)
        if chunk is None:
            chunk = _block_inputs(model, plan, x, k, width, cdtype.itemsize, budget)
        if plan is None:
            _reference_into(model, x, entries, out3, v, chunk)
        else:
            _structured_into(model, plan, x, out3, v, chunk)
    return result


def _block_inputs(model: nn.Module, plan: Plan | None, x: Tensor, k: int, width: int, itemsize: int,
                  budget: int) -> int:
    """Samples per block: as many as fit the block's share of the budget (at least one)."""
    one = per_sample_bytes(plan, lambda: model(x[:1]), k=k, width=width, itemsize=itemsize)
    if one > budget:
        raise ConfigError(f"budget_bytes={budget:,} is below what one sample of the Jacobian needs "
                          f"({one:,} bytes); raise it")
    return max(1, min(x.shape[0], jacobian_block_bytes(budget) // one))
