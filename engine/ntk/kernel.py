"""One-call eNTKs, and the Jacobian store job.

* :func:`entk`: every kernel shape (full, traced, diagonal, pNTK), cross-kernels,
  parameter subsets and per-layer kernels, in one pass per row block
  (:mod:`engine.ntk.onepass`): J is never materialised beyond one layer chunk.
* stored: :func:`jacobian_to_store` streams row blocks of J into a memory-mapped HDF5
  file (resumable), then :func:`~engine.ntk.gram.gram` reads it out of core.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..errors import ConfigError, parse_enum
from ..heap import with_freed_memory_reused
from ..progress import progress as progress_bar
from ..store import JacobianStore
from .budget import (
    DEFAULT_BUDGET,
    check_budget,
    entk_budget_for,
    entk_row_blocks,
    entk_shares,
    per_sample_bytes,
    widest_unit,
)
from .capture import make_plan
from .contract import bf16_matrix_unit
from .jacobian import jacobian
from .kinds import Implementation, KernelKind
from .onepass import onepass_kernel
from .params import (
    check_mode,
    check_projection,
    eval_mode,
    owner_names,
    parameter_layout,
    params_dtype_device,
    selected_entries,
)
from .planner import Contraction


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
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"model output must be one (N, C) logits tensor, got a {type(out).__name__}")
    if out.ndim != 2:
        raise ConfigError(f"model output must be (N, C) logits, got shape {tuple(out.shape)}")
    return int(out.shape[1])


def _as_inputs(x: object, what: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """x as a tuple of tensors batched on dim 0, on the model's device.

    Integer and bool tensors (token ids, masks) pass untouched. A float tensor of another
    float dtype than the parameters is refused rather than cast: casting float64 data to a
    float32 model silently drops precision the caller put in, and the other way round
    changes the model's arithmetic; the caller decides.
    """
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if not xs or not all(isinstance(t, torch.Tensor) for t in xs):
        got = type(x).__name__ if not isinstance(x, (tuple, list)) else f"a {type(x).__name__} of " + \
            ", ".join(type(t).__name__ for t in xs)
        raise ConfigError(f"{what} must be a tensor (N, ...) or a tuple of tensors batched on dim 0, got {got}")
    n = xs[0].shape[0] if xs[0].dim() else 0
    for i, t in enumerate(xs):
        name = what if len(xs) == 1 else f"{what}[{i}]"
        if t.dim() < 1 or t.shape[0] < 1:
            raise ConfigError(f"{name} must have shape (N, ...) with N >= 1 samples, got {tuple(t.shape)}")
        if t.shape[0] != n:
            raise ConfigError(f"{what}: all tensors must have the same batch size on dim 0, got "
                              f"{[int(u.shape[0]) for u in xs]}")
        if (t.is_floating_point() or t.is_complex()) and t.dtype != dtype:
            raise ConfigError(f"{name} has dtype {t.dtype} but the model's parameters are {dtype}; "
                              f"pass {name}.to({dtype}) (float inputs are not cast silently)")
    return tuple(t.detach().to(device) for t in xs)


def _probe_outputs(model: torch.nn.Module, x: tuple[torch.Tensor, ...], what: str) -> int:
    try:
        with torch.no_grad():
            y = model(*(t[:1] for t in x))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{what} of shape {[tuple(t.shape) for t in x]} does not fit model "
                          f"{type(model).__name__} (one sample failed: {first})") from exc
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != 1:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"model {type(model).__name__} must return logits of shape (N, C); got {shape}")
    return int(y.shape[1])


_warned_bf16 = False


@with_freed_memory_reused
def entk(model: torch.nn.Module, x1, x2=None, *, kernel: str | KernelKind = "full",
         param_names: str | Iterable[str] | None = None, per_layer: bool = False,
         compute_dtype: torch.dtype | None = None, budget_bytes: int = DEFAULT_BUDGET,
         implementation: str | Implementation = "auto", force_eval: bool = False,
         progress: bool | None = False, projection: torch.Tensor | None = None,
         dtype: torch.dtype | None = None, backend: str | None = None,
         contraction: str | Contraction = "auto") -> torch.Tensor | dict[str, torch.Tensor]:
    """The empirical NTK of ``model`` at ``x1`` (and ``x2``), computed in one pass per row block.

    Args:
        model: returns logits (N, C); in eval mode (BatchNorm on running statistics)
            unless ``force_eval`` (every module switched to eval for the call, then restored).
        x1, x2: inputs, a tensor (N, ...) of any dtype (integer token ids pass as they
            are; float inputs must have the parameters' dtype) or a tuple of tensors
            batched on dim 0 (the model is called as ``model(*x)``). ``x2=None``: the
            symmetric kernel of x1 (only its upper triangle is computed).
        kernel: ``"full"`` (N1·C, N2·C), row ``n·C + c``; ``"traced"`` (N1, N2), the
            sum of the C × C blocks; ``"diagonal"`` (N1, C, C), the per-sample blocks
            (no cross-sample terms; x2 must be None); ``"pntk"`` (N1, N2), the kernel of
            the single output Σ_c f_c / √C (one backward per block).
        param_names: the kernel of these parameters only: one name or an iterable of names
            (see ``parameter_layout``).
        per_layer: return ``{key: kernel}``, key = the name of the module owning each
            parameter (its name in ``named_parameters`` less the last component; a parameter
            of the top-level module, such as a positional embedding ``self.pos``, keys by its
            own name), in model order, as :func:`~engine.ntk.entk_fn` does; the values sum to
            the full kernel.
        compute_dtype: ``None`` (the parameters' dtype, float32 or float64) or
            ``torch.bfloat16``: the Jacobian chunks are bfloat16 and the Gram products
            accumulate in float32 (native on CUDA / CPUs with AMX or AVX512-BF16, where the
            rules also form the chunks from bfloat16 operands; elsewhere emulated in float32
            at float32 speed, with a warning).
        budget_bytes: bound on the working memory (block data and column chunks, not the
            result; default :data:`~engine.ntk.budget.DEFAULT_BUDGET`); a budget below what one
            sample needs is refused up front. Inputs whose block data exceed it are split into blocks, and the inner
            blocks are recomputed per tile (more time, bounded memory).
        implementation: ``"auto"`` (= ``"structured"``: layer rules, torch.func for the
            rest) or ``"reference"`` (torch.func for every column).
        projection: v (C,): the kernel of the single output v·f (N1, N2) with
            ``kernel="full"``.
        dtype: result dtype (default: float32, or float64 for a float64 model).
        contraction: how each layer's block is contracted: ``"auto"`` (the cheaper per layer
            by :func:`engine.ntk.plan`'s cost model), ``"materialise"`` (per-sample gradient
            columns, then their Gram) or ``"pairs"`` (spatial pairs wherever a layer rule
            offers them: convolutions, Linear); the same kernel either way.
        backend: deprecated name of ``implementation``.

    Returns:
        The kernel on the model's device, or a dict of per-layer kernels.
    """
    global _warned_bf16
    if backend is not None:
        warnings.warn("entk(backend=...) is deprecated; use implementation=... (backend= will be removed "
                      "in the next release)", DeprecationWarning, stacklevel=2)
        implementation = backend
    kind = parse_enum(KernelKind, kernel, "kernel")
    impl = parse_enum(Implementation, implementation, "implementation")
    how = parse_enum(Contraction, contraction, "contraction")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    entries = selected_entries(model, param_names)
    pdtype, device = params_dtype_device(model, entries)
    check_mode(model, force_eval)
    if compute_dtype is None or compute_dtype == pdtype:
        bf16 = False
    elif compute_dtype == torch.bfloat16:
        if pdtype != torch.float32:
            raise ConfigError(f"compute_dtype=torch.bfloat16 needs a float32 model, got {pdtype} parameters")
        bf16 = True
    else:
        raise ConfigError(f"compute_dtype must be None, the parameters' dtype ({pdtype}) or torch.bfloat16, "
                          f"got {compute_dtype}")
    out_dtype = pdtype if dtype is None else dtype
    if out_dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {out_dtype}")
    budget_bytes = check_budget(budget_bytes)
    if kind is KernelKind.DIAGONAL and x2 is not None:
        raise ConfigError("kernel='diagonal' has no cross-kernel: pass x2=None")
    if projection is not None and kind is not KernelKind.FULL:
        raise ConfigError("a projection already gives one output: use kernel='full' (N×N)")
    xs1 = _as_inputs(x1, "x1", pdtype, device)
    xs2 = None if x2 is None else _as_inputs(x2, "x2", pdtype, device)
    if bf16 and device.type == "cpu" and not bf16_matrix_unit() and not _warned_bf16:
        _warned_bf16 = True
        warnings.warn("this CPU has no bfloat16 matrix unit (no amx_bf16 / avx512_bf16 flag): "
                      "compute_dtype=bfloat16 is emulated in float32, with bfloat16's error and no speed-up",
                      RuntimeWarning, stacklevel=2)
    with eval_mode(model):
        c = _probe_outputs(model, xs1, "x1")
        if xs2 is not None:
            _probe_outputs(model, xs2, "x2")
        v = None
        if projection is not None:
            v = check_projection(projection, c, pdtype, device)
        elif kind is KernelKind.PNTK:
            v = torch.full((c,), 1 / math.sqrt(c), dtype=pdtype, device=device)
        k = 1 if v is not None else c
        bar = None
        if progress:
            def bar(it):
                return progress_bar(it, desc="eNTK tiles", enabled=progress, unit="tile")
        out = onepass_kernel(model, xs1, xs2, entries, kind=kind, k=k, v=v, per_layer=per_layer,
                             implementation=impl, bf16=bf16, dtype=pdtype, budget_bytes=budget_bytes,
                             progress=bar, contraction=how)
    if out_dtype != pdtype:
        out = {key: h.to(out_dtype) for key, h in out.items()} if per_layer else out.to(out_dtype)
    return out


def _sample_estimate(model: torch.nn.Module, x, kind: KernelKind) -> tuple[int, int]:
    """(block data per input, one widest column unit of its outputs) in bytes, as entk plans them."""
    entries = selected_entries(model, None)
    pdtype, device = params_dtype_device(model, entries)
    xs = _as_inputs(x, "x", pdtype, device)
    with eval_mode(model):
        k = 1 if kind is KernelKind.PNTK else _probe_outputs(model, xs, "x")
        plan = make_plan(model, entries)
        itemsize = torch.empty((), dtype=pdtype).element_size()
        one = per_sample_bytes(plan, lambda: model(*(t[:1] for t in xs)), k=k, width=entries[-1].end,
                               itemsize=itemsize, fallback=owner_names(model, entries)[2])
    return one, k * widest_unit(plan, entries) * itemsize


def entk_sample_bytes(model: torch.nn.Module, x: torch.Tensor, *, kernel: str | KernelKind = "full") -> int:
    """Bytes each input of an :func:`entk` call on ``model`` (all parameters, default implementation) adds
    to its block data, by the estimate ``entk`` plans its blocks with (:func:`~.budget.per_sample_bytes`
    on ``x[:1]``), plus one widest column unit of its outputs (``entk``'s floor for one sample): with
    ``n`` such inputs in one block, ``entk`` needs a budget of ``budget.entk_budget_for(n * this)``."""
    one, widest = _sample_estimate(model, x, parse_enum(KernelKind, kernel, "kernel"))
    return one + widest


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How an :func:`entk` call splits its inputs into row blocks at a budget (see :func:`entk_blocks`)."""

    inputs: int            # N1 + N2 (N1 for a symmetric or diagonal kernel)
    per_input: int         # block data per input, bytes
    block: int             # inputs per row block
    blocks: int            # row blocks of x1
    block_passes: int      # forward + K backward passes of a block, over the whole call
    inputs_run: int        # inputs taken through those passes (= inputs when nothing is recomputed)
    one_block_budget: int  # the smallest budget_bytes holding every input in one block

    @property
    def recompute(self) -> float:
        """Inputs run per input of the kernel: 1 when no block is recomputed."""
        return self.inputs_run / self.inputs


def entk_blocks(model: torch.nn.Module, x1, x2=None, *, kernel: str | KernelKind = "full",
                budget_bytes: int = DEFAULT_BUDGET) -> BlockLayout:
    """The row blocks an :func:`entk` call with these arguments would use (all parameters, float32 estimate).

    Below :attr:`BlockLayout.one_block_budget` the inputs no longer fit one block: a symmetric kernel of
    m blocks takes 1 + m(m-1)/2 block passes (each tile pair recomputes its column block) instead of
    one, so time grows about linearly in m while memory falls. Only ``x1[:1]`` is run.
    """
    kind = parse_enum(KernelKind, kernel, "kernel")
    check_budget(budget_bytes)
    n1 = int((x1 if isinstance(x1, torch.Tensor) else x1[0]).shape[0])
    n2 = 0 if x2 is None else int((x2 if isinstance(x2, torch.Tensor) else x2[0]).shape[0])
    one, _ = _sample_estimate(model, x1, kind)
    total = n1 if kind is KernelKind.DIAGONAL else n1 + n2
    need = entk_budget_for(total * one)
    b, b2 = entk_row_blocks(n1, n2, kind, one, entk_shares(budget_bytes).data)
    if b >= n1 and b2 >= n2:
        return BlockLayout(total, one, max(n1, n2), 1, 1 if x2 is None else 2, total, need)
    sizes1 = [min(b, n1 - s0) for s0 in range(0, n1, b)]
    sizes2 = [min(b, n2 - s0) for s0 in range(0, n2, b)]
    m = len(sizes1)
    if kind is KernelKind.DIAGONAL:
        passes, run = m, n1
    elif x2 is None:  # row 0's block, then each row's column blocks right of its own (the last one carried over)
        passes = 1 + m * (m - 1) // 2
        run = sizes1[0] + sum(sum(sizes1[i + 1:]) for i in range(m))
    elif len(sizes2) == 1:
        passes, run = m + 1, n1 + n2
    else:
        passes, run = m + m * len(sizes2), n1 + m * n2
    return BlockLayout(total, one, b, m, passes, run, need)


def _first_bad_column(block: torch.Tensor) -> tuple[int, int] | None:
    bad = ~torch.isfinite(block)
    if not bad.any():
        return None
    r, col = bad.nonzero()[0].tolist()
    return r, col


def jacobian_to_store(model: torch.nn.Module, inputs: torch.Tensor, path: str | Path, *,
                      block_inputs: int | None = None, dtype: torch.dtype = torch.float32,
                      implementation: str | Implementation = "auto", job: Mapping | None = None,
                      budget_bytes: int = DEFAULT_BUDGET, overwrite: bool = False,
                      force_eval: bool = False, progress: bool | None = False) -> JacobianStore:
    """Stream the Jacobian of ``model`` on ``inputs`` into an HDF5 file, block by block.

    Rerunning the same call after an interruption resumes at the first incomplete
    block; the result is bit-identical to an uninterrupted run (each block depends
    only on the model and its inputs). Memory is bounded by ``block_inputs``
    (default: as many inputs as keep one block of J within half of ``budget_bytes``, the working
    memory; the other half is the Jacobian's own workspace and the write).
    """
    if model.training and not force_eval:
        raise ConfigError(f"{type(model).__name__} is in train mode; BatchNorm must use running statistics: "
                          "call model.eval() or pass force_eval=True")
    dev = _device_of(model)
    inputs = inputs.to(dev)
    pdtype, _ = params_dtype_device(model, selected_entries(model, None))
    if inputs.is_floating_point() and inputs.dtype != pdtype:  # before the file exists
        raise ConfigError(f"inputs have dtype {inputs.dtype} but the parameters of {type(model).__name__} are "
                          f"{pdtype}; convert the inputs (inputs.to({pdtype})) or the model so they match")
    c = num_outputs(model, inputs)
    layout = parameter_layout(model)
    p = layout[-1][3] if layout else 0
    budget_bytes = check_budget(budget_bytes)
    if block_inputs is None:
        block_inputs = max(1, min(inputs.shape[0], budget_bytes // 2 // max(c * p * 4, 1)))
    spec = {"model": getattr(model, "arch", type(model).__name__), "mode": "eval",
            "probe_hash": probe_hash(inputs), "backend": str(implementation),
            "params": [[n, list(s)] for n, s, _, _ in layout], **(job or {})}
    store = JacobianStore.create_for(path, job=spec, n_inputs=inputs.shape[0], num_outputs=c,
                                     n_params=p, block_inputs=block_inputs, dtype=dtype,
                                     overwrite=overwrite)
    fill_jacobian_store(store, model, inputs, [u for u, done in enumerate(store.complete) if not done],
                        implementation=implementation, force_eval=force_eval, progress=progress,
                        budget_bytes=budget_bytes // 2)
    return store


def fill_jacobian_store(store: JacobianStore, model: torch.nn.Module,
                        inputs: torch.Tensor | Callable[[int, int], torch.Tensor], units: Iterable[int], *,
                        projection: torch.Tensor | None = None, implementation: str | Implementation = "auto",
                        force_eval: bool = False, progress: bool | None = False, desc: str = "Jacobian blocks",
                        budget_bytes: int = DEFAULT_BUDGET) -> None:
    """Compute blocks ``units`` of ``store`` and write each, flagged complete once its bytes are written:
    the one writer of stored Jacobians (:func:`jacobian_to_store`, and the ``entk kernel`` job, whose ranks
    each fill their share of a store rank 0 created).

    ``inputs`` are the store's inputs, or a function ``(start, end)`` → those inputs (on the model's
    device), for callers that hold them compactly. ``projection`` stores the Jacobian of ``v · f`` (one
    row per input). A block with a non-finite entry is refused, naming the input, output and parameter.
    ``budget_bytes``: the working memory of each block's :func:`~engine.ntk.jacobian` call.
    """
    layout = parameter_layout(model)
    c = store.num_outputs
    dtype = store.torch_dtype("jacobian")
    with store.writer() as w:
        for u in progress_bar(list(units), desc=desc, enabled=progress, unit="block"):
            s, e = store.unit_inputs(u)
            x = inputs(s, e) if callable(inputs) else inputs[s:e]
            # float64 stores hold float64 Jacobians (of a float64 model); the others are cast from float32
            block = jacobian(model, x, implementation=implementation, force_eval=force_eval, projection=projection,
                             dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                             budget_bytes=budget_bytes)
            bad = _first_bad_column(block)
            if bad is not None:
                r, col = bad
                name = next(n for n, _, c0, c1 in layout if c0 <= col < c1)
                raise ConfigError(f"non-finite Jacobian in block {u} (input {s + r // c}, output {r % c}) "
                                  f"for parameter {name}; nothing of this block was stored")
            w.write("jacobian", s * c, block.to(dtype))
            w.mark_complete(u)

