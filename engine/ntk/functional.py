"""eNTKs of a function of a parameter dict: the entry point for other frontends, and the plain
torch.func reference of every kernel shape.

``apply_fn(params, x) -> (N, C)`` with ``params`` a dict name -> tensor, torch.func style::

    H = entk_fn(lambda p, x: torch.func.functional_call(model, p, (x,)),
                dict(model.named_parameters()), x_train, x_test, kernel="traced")

``entk_fn`` is :func:`~engine.ntk.entk`'s driver (:func:`engine.ntk.onepass.onepass_kernel`: the
tile schedule, the chunk packing, the contraction of :mod:`engine.ntk.contract`, the symmetrisation)
with a torch.func column source: for a block of inputs and a chunk of parameters,
``vmap(jacrev(...))`` forms the per-sample Jacobian columns (``vmap(grad(...))`` for pNTK: one VJP
per sample, :func:`engine.ntk.fallback.per_sample_jacobian`, the fallback ``entk`` uses for
parameters without a layer rule) and they are contracted at once into the kernel tile,
``tile += J_a J_bᵀ``; the whole Jacobian is never held. Only the parameters are differentiated;
inputs may be integer token ids or tuples, in any structure ``apply_fn`` takes.

Its memory model is the source's own (:func:`engine.ntk.budget.torch_func_blocks`): ``budget_bytes``
bounds the Jacobian blocks held, and chunks are as wide as the budget allows, because every
torch.func chunk costs a whole forward and backward per sample (``entk``'s layer-rule columns
are cheap to form, so its chunks are cache-sized instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import ConfigError, parse_enum
from ..heap import with_freed_memory_reused
from ..progress import progress as progress_bar
from .budget import DEFAULT_BUDGET, check_budget, jacobian_element_bytes, torch_func_blocks
from .contract import symmetrize
from .fallback import per_sample_jacobian
from .kinds import Implementation, KernelKind
from .onepass import onepass_kernel
from .params import Entry, as_names

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]


# ---------------------------------------------------------------------------------------------
# validation


def _leaves(x: Inputs, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        leaves = [x]
    elif isinstance(x, tuple | list):
        if not x:
            raise ConfigError(f"{what} is an empty {type(x).__name__}; expected a tensor or a tuple of tensors")
        leaves = list(x)
        for i, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"{what}[{i}] must be a tensor batched on dim 0, got {type(t).__name__}")
    else:
        raise ConfigError(f"{what} must be a tensor or a tuple of tensors batched on dim 0, got {type(x).__name__}")
    for i, t in enumerate(leaves):
        label = what if isinstance(x, torch.Tensor) else f"{what}[{i}]"
        if t.ndim == 0:
            raise ConfigError(f"{label} must be batched on dim 0, got a 0-d tensor")
    return leaves


def _batch_size(x: Inputs, what: str) -> int:
    leaves = _leaves(x, what)
    n = leaves[0].shape[0]
    for i, t in enumerate(leaves[1:], 1):
        if t.shape[0] != n:
            raise ConfigError(f"{what}[{i}] has batch size {t.shape[0]} but {what}[0] has {n}; "
                              "tuple inputs must agree on dim 0")
    if n == 0:
        raise ConfigError(f"{what} has no samples (batch size 0)")
    return int(n)


def _check_same_structure(x1: Inputs, x2: Inputs) -> None:
    l1, l2 = _leaves(x1, "x1"), _leaves(x2, "x2")
    if isinstance(x1, torch.Tensor) != isinstance(x2, torch.Tensor) or len(l1) != len(l2):
        s1 = "a tensor" if isinstance(x1, torch.Tensor) else f"a {type(x1).__name__} of {len(l1)} tensors"
        s2 = "a tensor" if isinstance(x2, torch.Tensor) else f"a {type(x2).__name__} of {len(l2)} tensors"
        raise ConfigError(f"x2 must have the structure of x1 ({s1}), got {s2}")
    for i, (a, b) in enumerate(zip(l1, l2, strict=True)):
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
            sfx = "" if isinstance(x1, torch.Tensor) else f"[{i}]"
            raise ConfigError(f"x2{sfx} must have per-sample shape {tuple(a.shape[1:])} and dtype {a.dtype} "
                              f"like x1{sfx}, got {tuple(b.shape[1:])} and {b.dtype}")


def _check_params(params: object) -> dict[str, torch.Tensor]:
    if not isinstance(params, Mapping):
        raise ConfigError(f"params must be a dict of name -> tensor (torch.func style), got {type(params).__name__}")
    if not params:
        raise ConfigError("params is empty; expected a dict of name -> tensor, e.g. dict(model.named_parameters())")
    for k, v in params.items():
        if not isinstance(k, str):
            raise ConfigError(f"params keys must be parameter names (str), got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"params[{k!r}] must be a tensor, got {type(v).__name__}")
    return {k: v.detach() for k, v in params.items()}


def _select(params: dict[str, torch.Tensor], param_names: Iterable[str] | str | None) -> list[str]:
    if param_names is None:
        names = list(params)
    else:
        wanted = as_names(param_names)
        if not wanted:
            raise ConfigError("param_names is empty; give at least one parameter name (or None for all)")
        unknown = [n for n in wanted if n not in params]
        if unknown:
            valid = list(params)
            more = f", ... ({len(valid)} in all)" if len(valid) > 5 else ""
            raise ConfigError(f"unknown parameter name(s) {', '.join(map(repr, unknown[:3]))} in param_names; "
                              f"valid names: {', '.join(map(repr, valid[:5]))}{more}")
        dup = sorted({n for n in wanted if wanted.count(n) > 1})
        if dup:
            raise ConfigError(f"param_names lists {dup[0]!r} more than once")
        keep = set(wanted)
        names = [n for n in params if n in keep]  # the dict's order: groups come out in model order
    for n in names:
        if not params[n].is_floating_point():
            raise ConfigError(f"params[{n!r}] is {params[n].dtype}; only floating-point tensors can be "
                              "differentiated (leave buffers out of params, or out of param_names)")
    devices = {params[n].device for n in names}
    if len(devices) > 1:
        raise ConfigError(f"the differentiated params live on several devices ({sorted(map(str, devices))}); "
                          "move them to one")
    return names


def _compute_dtype(dtype: object) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"compute_dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype


# ---------------------------------------------------------------------------------------------
# inputs and the per-sample function


def _like(x: tuple | list, items: Iterable) -> tuple | list:
    """``items`` in the container type of ``x`` (tuple, list or named tuple)."""
    return x._make(items) if hasattr(x, "_make") else type(x)(items)


def _to(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return _like(x, (t.to(device) for t in x))


def _one_batch(x: Inputs) -> Inputs:
    """A single sample (inside vmap) as a batch of one, in the caller's structure."""
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    return _like(x, (t.unsqueeze(0) for t in x))


def _check_output(out: object, c: int | None) -> int:
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"apply_fn must return an (N, C) tensor, got {type(out).__name__}")
    if out.ndim != 2 or out.shape[0] != 1 or (c is not None and out.shape[1] != c):
        want = f"(1, {c})" if c is not None else "(1, C)"
        raise ConfigError(f"apply_fn must return (N, C) outputs; on one sample it returned shape "
                          f"{tuple(out.shape)}, expected {want}")
    if not out.is_floating_point():
        raise ConfigError(f"apply_fn must return floating-point outputs, got {out.dtype}")
    return int(out.shape[1])


def _num_outputs(apply_fn: Callable, params: dict[str, torch.Tensor], x: Inputs, device: torch.device) -> int:
    first = x[:1] if isinstance(x, torch.Tensor) else _like(x, (t[:1] for t in x))
    with torch.no_grad():
        return _check_output(apply_fn(params, _to(first, device)), None)


# ---------------------------------------------------------------------------------------------
# the front end (tile products: engine.ntk.contract)


@with_freed_memory_reused
def entk_fn(apply_fn: Callable, params: Mapping[str, torch.Tensor], x1: Inputs, x2: Inputs | None = None, *,
            kernel: str | KernelKind = "full", param_names: str | Iterable[str] | None = None, per_layer: bool = False,
            compute_dtype: torch.dtype = torch.float32, budget_bytes: int = DEFAULT_BUDGET,
            progress: bool | None = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """The empirical NTK of ``apply_fn`` w.r.t. ``params`` on ``x1`` (against ``x2``).

    Args:
        apply_fn: ``apply_fn(params, x) -> (N, C)``; it receives a dict with every key of
            ``params`` and ``x`` in the structure of ``x1`` (a batch of rows of it).
        params: name -> floating-point tensor, e.g. ``dict(model.named_parameters())``.
        x1, x2: a tensor of any dtype (integer token ids too) or a tuple of tensors, batched on
            dim 0 (N1, N2 samples). ``x2=None``: the symmetric kernel of ``x1``; only the upper
            triangle of row blocks is computed and it is mirrored (exactly symmetric).
        kernel: ``"full"`` → ``(N1·C, N2·C)``, row n·C + c; ``"traced"`` → ``(N1, N2)``, Σ_c H_cc;
            ``"diagonal"`` → ``(N1, C, C)`` per-sample blocks, no cross-sample terms (``x2`` must
            be None); ``"pntk"`` → ``(N1, N2)``, the kernel of Σ_c f_c / √C (Mohamadi et al. 2023).
        param_names: differentiate only these keys of ``params``, one name or an iterable of
            names (the rest are held fixed).
        per_layer: return ``{key: kernel}``, key = the owning module's name (the parameter name
            less its last component; a parameter of the top-level module keys by its own name,
            as in :func:`~engine.ntk.entk`); the kernels sum to the full one.
        compute_dtype: ``torch.float32`` (contract in the Jacobian's own precision: float64
            params give a float64 kernel) or ``torch.bfloat16`` (the Jacobian chunks rounded to
            bfloat16, float32 accumulation, float32 kernel, as :func:`~engine.ntk.entk` does:
            bfloat16 products on CUDA and CPUs with a bfloat16 matrix unit, where the CPU's
            ``torch.mm`` rounds each chunk's tile to bfloat16; elsewhere multiplied in float32).
        budget_bytes: the working memory: bounds the Jacobian blocks held at once (not counting
            the activations inside ``vmap``; default :data:`~engine.ntk.budget.DEFAULT_BUDGET`);
            below one sample of the widest parameter it is refused up front.
        progress: a progress bar over the tiles (block pairs).

    Returns:
        The kernel on the parameters' device, or a dict of kernels with ``per_layer``.
    """
    shape = parse_enum(KernelKind, kernel, "kernel")
    if not callable(apply_fn):
        raise ConfigError(f"apply_fn must be callable as apply_fn(params, x), got {type(apply_fn).__name__}")
    params = _check_params(params)
    names = _select(params, param_names)
    n1 = _batch_size(x1, "x1")
    n2 = None
    if x2 is not None:
        if shape is KernelKind.DIAGONAL:
            raise ConfigError("kernel='diagonal' gives per-sample blocks of one input set; x2 must be None")
        n2 = _batch_size(x2, "x2")
        _check_same_structure(x1, x2)
    cdtype = _compute_dtype(compute_dtype)
    budget = check_budget(budget_bytes)
    if not isinstance(per_layer, bool):
        raise ConfigError(f"per_layer must be True or False, got {per_layer!r}")

    device = params[names[0]].device
    jdtype = torch.float64 if any(params[n].dtype == torch.float64 for n in names) else torch.float32
    acc = torch.float32 if cdtype == torch.bfloat16 else jdtype
    c = _num_outputs(apply_fn, params, x1, device)
    pntk = shape is KernelKind.PNTK
    rows = 1 if pntk else c
    widest = max(((n, params[n].numel()) for n in names), key=lambda t: t[1])
    blocks = torch_func_blocks(n1, n2, shape, rows, widest, jacobian_element_bytes(jdtype, cdtype), budget)

    def columns(entries: list[Entry], xb: Inputs, dest: torch.Tensor, cols: list[tuple[int, int]]) -> None:
        """The column source: per-sample Jacobians of ``apply_fn`` w.r.t. these entries' parameters,
        ``(b, C, cols)``, or ``(b, 1, cols)`` for pNTK (the gradient of Σ_c f_c / √C, one VJP per sample)."""
        chunk = {e.name: params[e.name] for e in entries}
        fixed = {k: v for k, v in params.items() if k not in chunk}

        def f(p, x):
            out = apply_fn({**fixed, **p}, _one_batch(x))
            _check_output(out, c)
            return out[0].sum() / math.sqrt(c) if pntk else out[0]

        jac = per_sample_jacobian(f, chunk, xb, rows, pntk)
        for e, (c0, c1) in zip(entries, cols, strict=True):
            dest[:, :, c0:c1].copy_(jac[e.name])

    entries, col = [], 0
    for n in names:
        entries.append(Entry(n, params[n], col, col + params[n].numel()))
        col += params[n].numel()
    bar = None
    if progress:
        def bar(it):
            return progress_bar(it, desc="entk_fn", enabled=progress, unit="tile")
    # The one driver of entk, with this column source and this memory model (module docstring).
    out = onepass_kernel(None, _to(x1, device), None if x2 is None else _to(x2, device), entries, kind=shape,
                         k=rows, v=None, per_layer=per_layer, implementation=Implementation.REFERENCE,
                         bf16=cdtype == torch.bfloat16, dtype=acc, budget_bytes=budget, progress=bar,
                         columns=columns, blocks=blocks)
    if shape is KernelKind.DIAGONAL:  # each per-sample block exactly symmetric, as every symmetric kernel
        for h in (out.values() if per_layer else [out]):
            symmetrize(h)
    return out
