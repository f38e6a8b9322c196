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
    (``engine/ntk/_layers.py``: Linear, Conv1d/2d, BatchNorm, LayerNorm, GroupNorm,
    Embedding),
    written straight into J's columns. Parameters without a rule (or used in a way
    a rule cannot see) fall back to the reference backend for just their columns;
    :func:`structured_coverage` says which.
``auto``
    The structured backend.

Measured (CPU, 2 cores of an Intel Xeon VM, torch 2.14.1, float32, C = 10, full J,
fresh J each call, best of 5 with the backends alternating)::

    python -c 'from engine.ntk.jacobian import _time_backends as t; t("resnet20", 64, reps=5)'

    resnet20, N=64, J 640 x 269,722:  structured 1.24 s vs reference 1.53 s (1.2x)
    cnn,      N=64, J 640 x 24,346:    structured 0.093 s vs reference 0.144 s (1.5x)
    mlp,      N=64, J 640 x 411,146:   structured 0.23 s vs reference 0.52 s (2.2x)

Why not more on resnet20: both backends do the same arithmetic. Each of the
N·C·P entries of a conv weight's columns is a sum over the L output positions, so
forming J costs C forward passes' worth of multiply-adds (26 G for resnet20 at
N=64), and the C output gradients cost C backward passes (another 26 G); torch.func
batches the per-sample weight gradients of ``vmap(jacrev)`` into large kernels too.
The structured backend's edge is in the shape of its work (one GEMM per layer over
all C outputs, no per-sample graph), not in doing less of it; a bigger win needs
not materialising J at all (e.g. per-layer kernels), which is the Gram's business.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.overrides import TorchFunctionMode

from engine.errors import ConfigError, EngineError, parse_enum
from engine.ntk._layers import LayerRule, is_batch_dependent, rule_for

__all__ = ["JacobianBackend", "jacobian", "parameter_layout", "structured_coverage"]

# Reference chunk: keep one chunk's Jacobian under this many bytes.
_REFERENCE_CHUNK_BYTES = 256 << 20
# Structured chunk: keep one block's stored output gradients, unfolded patches and
# autograd graph under this many bytes (estimated from a one-sample probe).
_STRUCTURED_CHUNK_BYTES = 256 << 20


class JacobianBackend(str, enum.Enum):  # noqa: UP042 - same str-mixin form as the other engine enums
    """How :func:`jacobian` computes J (see the module docstring)."""

    AUTO = "auto"
    REFERENCE = "reference"
    STRUCTURED = "structured"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Entry:
    name: str
    param: nn.Parameter
    start: int
    end: int


def _model_name(model: nn.Module) -> str:
    return str(getattr(model, "arch", type(model).__name__))


def layer_of(name: str) -> str:
    """The per-layer key of a parameter: its owning module's name ("layer1.0.conv1" for
    "layer1.0.conv1.weight"); a parameter of the top-level module keys by its own name ("scale")."""
    return name.rpartition(".")[0] or name


def as_names(param_names: str | Iterable[str] | None) -> list[str] | None:
    """``param_names`` as a list: one name as a string, or an iterable of names (None: all)."""
    if param_names is None:
        return None
    if isinstance(param_names, str):
        return [param_names]
    try:
        names = list(param_names)
    except TypeError:
        raise ConfigError(f"param_names must be a parameter name or an iterable of names, got "
                          f"{type(param_names).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"param_names must hold parameter names (str), got {bad[0]!r}")
    return names


def selected_entries(model: nn.Module, param_names: str | Iterable[str] | None) -> list[Entry]:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    wanted: set[str] | None = None
    param_names = as_names(param_names)
    if param_names is not None:
        wanted = set(param_names)
        if not wanted:
            raise ConfigError("param_names is empty; pass None for all trainable parameters")
        known = {n for n, _ in named}
        unknown = sorted(wanted - known)
        if unknown:
            sample = ", ".join(n for n, _ in named[:6]) + (", ..." if len(named) > 6 else "")
            raise ConfigError(
                f"unknown parameter name(s) {', '.join(map(repr, unknown))} for model {_model_name(model)}; "
                f"names look like: {sample}"
            )
        frozen = sorted(n for n, p in named if n in wanted and not p.requires_grad)
        if frozen:
            raise ConfigError(
                f"parameter(s) {', '.join(map(repr, frozen))} do not require grad; the Jacobian has columns "
                "only for trainable parameters"
            )
    out: list[Entry] = []
    col = 0
    for name, p in named:
        if not p.requires_grad or (wanted is not None and name not in wanted):
            continue
        out.append(Entry(name, p, col, col + p.numel()))
        col += p.numel()
    if not out:
        raise ConfigError(f"model {_model_name(model)} has no trainable parameters")
    return out


def parameter_layout(
    model: nn.Module, param_names: str | Iterable[str] | None = None
) -> list[tuple[str, torch.Size, int, int]]:
    """Column layout of J: ``(name, shape, col_start, col_end)`` per trainable parameter.

    In ``model.named_parameters()`` order (shared parameters once, under their first
    name), restricted to ``param_names`` (one name, or an iterable of names) when given; ``col_end - col_start`` is the
    parameter's numel. Raises ``ConfigError`` naming unknown or frozen names.
    """
    return [(e.name, e.param.shape, e.start, e.end) for e in selected_entries(model, param_names)]


# --------------------------------------------------------------------------- checks


def _parse_backend(backend: JacobianBackend | str) -> JacobianBackend:
    return parse_enum(JacobianBackend, backend, "Jacobian backend")


def params_dtype_device(model: nn.Module, entries: Sequence[Entry]) -> tuple[torch.dtype, torch.device]:
    dtypes = {e.param.dtype for e in entries}
    devices = {e.param.device for e in entries}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ConfigError(
            f"the selected parameters of {_model_name(model)} mix dtypes {sorted(map(str, dtypes))} or devices "
            f"{sorted(map(str, devices))}; cast the model to one dtype and device"
        )
    dtype = dtypes.pop()
    if not dtype.is_floating_point:
        raise ConfigError(f"parameters of {_model_name(model)} have non-float dtype {dtype}")
    return dtype, devices.pop()


def _check_x(x: object, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise ConfigError(f"x must be a torch.Tensor of shape (N, ...), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ConfigError(f"x must have shape (N, ...) with N >= 1 samples, got shape {tuple(x.shape)}")
    # Integer inputs (token ids) pass untouched; float inputs must match the parameters.
    if (x.is_floating_point() or x.is_complex()) and x.dtype != dtype:
        raise ConfigError(
            f"x has dtype {x.dtype} but the model's parameters are {dtype}; convert x (e.g. x.to({dtype})) "
            "or the model so they match"
        )
    if x.device != device:
        raise ConfigError(f"x is on {x.device} but the model's parameters are on {device}")
    return x


def check_mode(model: nn.Module, force_eval: bool) -> None:
    if not force_eval and any(m.training for m in model.modules()):
        raise ConfigError(
            f"model {_model_name(model)} is in train mode; BatchNorm must use running statistics: "
            "call model.eval() or pass force_eval=True"
        )
    for name, m in model.named_modules():
        if is_batch_dependent(m):
            raise ConfigError(
                f"BatchNorm {name or _model_name(model)} has track_running_stats=False, so each output depends "
                "on the whole batch and per-sample Jacobians are undefined; use running statistics"
            )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside; each module's own flag restored after, even on error."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _probe(model: nn.Module, x: Tensor) -> int:
    """Run one sample through the model to validate shapes; returns C."""
    try:
        with torch.no_grad():
            y = model(x[:1])
    except EngineError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"x of shape {tuple(x.shape)} does not fit model {_model_name(model)} (one sample failed: {first})"
        ) from exc
    if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[0] != 1:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(
            f"model {_model_name(model)} must return logits of shape (N, C); for x[:1] it returned {shape}"
        )
    return int(y.shape[1])


def check_projection(v: object, c: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(v, Tensor) or not (v.dtype.is_floating_point) or tuple(v.shape) != (c,):
        what = f"shape {tuple(v.shape)} dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
        raise ConfigError(f"projection must be a float tensor of shape ({c},) (one weight per output), got {what}")
    return v.detach().to(device=device, dtype=dtype)


def _check_out(out: object, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, Tensor):
        raise ConfigError(f"out must be a torch.Tensor of shape {shape}, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ConfigError(f"out has shape {tuple(out.shape)}; expected {shape} (rows N·C or N, columns P)")
    if out.dtype != dtype:
        raise ConfigError(f"out has dtype {out.dtype} but dtype={dtype} was requested; pass dtype={out.dtype}")
    if out.device != device:
        raise ConfigError(f"out is on {out.device} but the model is on {device}")
    if not out.is_contiguous():
        raise ConfigError("out must be contiguous (row-major), e.g. torch.empty(shape)")
    if out.requires_grad:
        raise ConfigError("out must not require grad")
    return out


def _check_chunk(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


# --------------------------------------------------------------------------- reference


def _reference_into(
    model: nn.Module,
    x: Tensor,
    entries: Sequence[Entry],
    out3: Tensor,
    projection: Tensor | None,
    chunk_size: int | None,
) -> None:
    """Write the columns of ``entries`` of J (as ``out3``, (N, K, P)) with torch.func."""
    selected = {e.name: e.param.detach() for e in entries}
    # The unselected parameters and the buffers stay the module's own tensors.

    def single(params: dict[str, Tensor], x1: Tensor) -> Tensor:
        y = functional_call(model, params, (x1.unsqueeze(0),))[0]
        return y if projection is None else y @ projection

    n, k = x.shape[0], out3.shape[1]
    if chunk_size is None:
        width = sum(e.end - e.start for e in entries)
        chunk_size = max(1, _REFERENCE_CHUNK_BYTES // max(1, k * width * x.element_size()))
    for s in range(0, n, chunk_size):
        e_ = min(n, s + chunk_size)
        # no_grad only outside the transforms (they ignore it): without it the result
        # would carry a graph back to the unselected parameters.
        with torch.no_grad():
            jac = _per_sample_jacobian(single, selected, x[s:e_], projection is not None)
            for entry in entries:
                out3[s:e_, :, entry.start : entry.end].copy_(jac[entry.name].reshape(e_ - s, k, -1))
        del jac


def _per_sample_jacobian(single, params: dict[str, Tensor], x: Tensor, scalar: bool) -> dict[str, Tensor]:
    """{name: (n, [C,] *shape)} per-sample Jacobians of ``single(params, x_n)``."""
    if scalar:
        return vmap(grad(single), in_dims=(None, 0))(params, x)
    try:
        return vmap(jacrev(single), in_dims=(None, 0))(params, x)
    except RuntimeError:
        # Nested vmap (samples x outputs) trips over a few batching rules (torch 2.14:
        # PReLU's backward raises a shape error); one vmap level per output works.
        c = single(params, x[0]).shape[0]
        cols = [vmap(grad(lambda p, x1, j=j: single(p, x1)[j]), in_dims=(None, 0))(params, x) for j in range(c)]
        return {name: torch.stack([col[name] for col in cols], dim=1) for name in params}


# --------------------------------------------------------------------------- structured


# Tensor accesses that read metadata or detach: they add no gradient path, so a
# parameter touched this way outside its module does not need the fallback, and a
# captured output read this way is still used only by its one consumer.
_NO_GRAD_PATH = frozenset(
    {
        Tensor.shape.__get__,
        Tensor.dtype.__get__,
        Tensor.device.__get__,
        Tensor.ndim.__get__,
        Tensor.requires_grad.__get__,
        Tensor.data.__get__,
        Tensor.size,
        Tensor.dim,
        Tensor.numel,
        Tensor.stride,
        Tensor.is_contiguous,
        Tensor.is_floating_point,
        Tensor.element_size,
        Tensor.data_ptr,
        Tensor.detach,
        Tensor.__len__,
    }
)


def _tensors(args: tuple, kwargs: dict) -> Iterator[object]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class _UseTracker(TorchFunctionMode):
    """Watches every torch op of the structured forward.

    * A selected parameter used outside a call of its owner (tied weights,
      ``F.linear(h, self.fc.weight)`` in a parent's forward, a forward invoked
      without ``__call__``) would silently lose that contribution in a layer rule,
      so it is flagged for the fallback.
    * Counts the ops that consume each captured module output, to know when an
      output feeds nothing but one BatchNorm (then its gradient is derived).
    """

    def __init__(self, owners: dict[int, frozenset[int]]):
        super().__init__()
        self.owners = owners
        self.active: dict[int, int] = {}
        self.escaped: set[int] = set()
        self.uses: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _NO_GRAD_PATH:
            for t in _tensors(args, kwargs):
                key = id(t)
                if key in self.uses:
                    self.uses[key] += 1
                mods = self.owners.get(key)
                if mods is not None and not any(self.active.get(m, 0) for m in mods):
                    self.escaped.add(key)
        return func(*args, **kwargs)


@dataclass(eq=False)
class Call:
    """One call of a hooked module: its input (detached) and output (in the graph)."""

    module: nn.Module
    a: Tensor
    y: Tensor
    src: int  # id() of the input object as passed, to match it with a producer's output
    versions: tuple[int, int]
    # The call whose stored output gradient this call uses, and the factor along
    # the output's dim 1 (None: its own gradient).
    base: Call | None = None
    scale: Tensor | None = None


@dataclass
class Plan:
    """Static part of the structured backend for one model and parameter selection."""

    entries: list[Entry]
    # param id -> ids of the modules holding it (only for structured params)
    owners: dict[int, frozenset[int]]
    structured: set[int]  # param ids every holder of which has a rule for that slot
    modules: list[nn.Module]  # modules to hook: holders of structured params
    rules: dict[int, LayerRule] = field(default_factory=dict)  # module id -> rule
    slots: dict[int, list[tuple[str, Entry]]] = field(default_factory=dict)  # module id -> (attr, entry)


def make_plan(model: nn.Module, entries: list[Entry]) -> Plan:
    by_id = {id(e.param): e for e in entries}
    holders: dict[int, list[tuple[nn.Module, str]]] = {pid: [] for pid in by_id}
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is not None and id(p) in holders:
                holders[id(p)].append((m, attr))
    plan = Plan(entries, {}, set(), [])
    for e in entries:
        slots = holders[id(e.param)]
        rules = [rule_for(m) for m, _ in slots]
        if not slots or any(r is None or attr not in r.params for r, (_, attr) in zip(rules, slots, strict=True)):
            continue
        plan.structured.add(id(e.param))
        plan.owners[id(e.param)] = frozenset(id(m) for m, _ in slots)
        for (m, attr), rule in zip(slots, rules, strict=True):
            if id(m) not in plan.rules:
                plan.rules[id(m)] = rule
                plan.slots[id(m)] = []
                plan.modules.append(m)
            plan.slots[id(m)].append((attr, e))
    return plan


class Recorder:
    """Hooks the planned modules for one forward: their calls and who must fall back."""

    def __init__(self, plan: Plan, n: int):
        self.plan = plan
        self.n = n
        self.calls: list[Call] = []
        self.bad_modules: set[int] = set()
        self.tracker = _UseTracker(plan.owners)
        self._handles: list = []

    def _pre(self, module: nn.Module, args: tuple) -> None:
        key = id(module)
        self.tracker.active[key] = self.tracker.active.get(key, 0) + 1

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, y: object) -> None:
        key = id(module)
        self.tracker.active[key] -= 1
        a = args[0] if len(args) == 1 and not kwargs else None
        # The rules read row n of the input and output as sample n's: anything else
        # (an unbatched call, samples folded into the batch dim) goes to the fallback.
        if (
            not isinstance(a, Tensor)
            or not isinstance(y, Tensor)
            or a.dim() == 0
            or y.dim() < 2
            or a.shape[0] != self.n
            or y.shape[0] != self.n
            or not self.plan.rules[key].supports(module, a, y)
        ):
            self.bad_modules.add(key)
            return
        src = id(a)
        a = a.detach()
        self.calls.append(Call(module, a, y, src, (a._version, y._version)))
        self.tracker.uses[id(y)] = 0

    def __enter__(self) -> Recorder:
        try:
            for m in self.plan.modules:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))
            self.tracker.__enter__()
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        try:
            self.tracker.__exit__(*exc)
        finally:
            self._remove()

    def fallback_ids(self) -> set[int]:
        """Ids of all selected params that must use the fallback after this forward."""
        bad = set(self.bad_modules)
        for call in self.calls:
            # An in-place op after the call changed the captured input or output, so
            # neither the patches nor the gradient w.r.t. the output are the call's.
            if (call.a._version, call.y._version) != call.versions:
                bad.add(id(call.module))
        out = {id(e.param) for e in self.plan.entries if id(e.param) not in self.plan.structured}
        out |= self.tracker.escaped & self.plan.structured
        for key in bad:
            out.update(id(e.param) for _, e in self.plan.slots[key])
        return out

    def resolve(self, fallback: set[int]) -> list[Call]:
        """The calls that contribute columns, each linked to the call whose gradient it uses.

        A call whose output is consumed by exactly one op, the input of a following
        BatchNorm call (conv → BN, linear → BN), borrows that call's gradient times
        the BatchNorm's per-channel slope: one stored gradient instead of two.
        """
        plan = self.plan
        keep = {
            id(c)
            for c in self.calls
            if c.y.requires_grad and any(id(e.param) not in fallback for _, e in plan.slots[id(c.module)])
        }
        calls = [c for c in self.calls if id(c) in keep]
        # Walk backwards so that by_src only holds later calls: an earlier call's
        # input may have been freed and its id() reused by this call's output.
        by_src: dict[int, Call] = {}
        for c in reversed(calls):
            nxt = by_src.get(id(c.y))
            rule = None if nxt is None else plan.rules[id(nxt.module)]
            if nxt is not None and rule.input_scale is not None and self.tracker.uses.get(id(c.y)) == 1:
                s = rule.input_scale(nxt.module).to(c.y.dtype)
                # Chains (a BN feeding only a BN) resolve to the last call's gradient.
                c.base, c.scale = nxt.base or nxt, s if nxt.scale is None else s * nxt.scale
            by_src[c.src] = c
        return calls


def _per_sample_bytes(plan: Plan, model: nn.Module, x1: Tensor, k: int) -> int:
    """Rough memory per input sample of one structured block, from a one-sample forward."""
    rec = Recorder(plan, 1)
    with rec, torch.no_grad():
        model(x1)
    calls = rec.resolve(set()) if rec.calls else []
    total = 0
    for call in rec.calls:
        kernel = getattr(call.module, "kernel_size", (1,))
        kk = 1
        for d in kernel:
            kk *= int(d)
        # The forward graph (~2 activations per hooked output) and the patches.
        total += 2 * call.y.numel() + kk * call.a.numel()
    # K stored output gradients per call that keeps its own.
    total += k * sum(c.y.numel() for c in calls if c.base is None)
    return max(1, total * x1.element_size())


def output_grads(f: Tensor, ys: list[Tensor], projection: Tensor | None) -> list[Tensor | None]:
    """Per captured output y: the (n, K, *y.shape[1:]) gradients of the K scalar outputs.

    One backward per output c (samples are independent, so the gradient of Σ_n f_c(x_n)
    holds every sample's own gradient). A hook on each y copies its gradient into
    the stacked buffer while it is still in cache, instead of stacking afterwards.
    None for a y that does not reach f.
    """
    n, c = f.shape
    k = 1 if projection is not None else c
    bufs = [torch.empty((n, k, *y.shape[1:]), dtype=y.dtype, device=y.device) for y in ys]
    seen = [False] * len(ys)
    col = [0]

    def grab(i: int):
        def hook(g: Tensor) -> None:
            bufs[i][:, col[0]].copy_(g)
            seen[i] = True

        return hook

    handles = [y.register_hook(grab(i)) for i, y in enumerate(ys)]
    try:
        if projection is not None:
            torch.autograd.grad(f, ys, grad_outputs=projection.expand(n, c), allow_unused=True)
        else:
            onehot = torch.zeros_like(f)
            for j in range(c):
                col[0] = j
                onehot.zero_()
                onehot[:, j] = 1
                # The returned gradients were already copied by the hooks; drop them.
                torch.autograd.grad(f, ys, grad_outputs=onehot, retain_graph=j < c - 1, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [b if ok else None for b, ok in zip(bufs, seen, strict=True)]


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
    x: Tensor,
    entries: list[Entry],
    out3: Tensor,
    projection: Tensor | None,
    chunk_size: int | None,
) -> None:
    plan = make_plan(model, entries)
    n, k = x.shape[0], out3.shape[1]
    if chunk_size is None:
        chunk_size = max(1, min(n, _STRUCTURED_CHUNK_BYTES // _per_sample_bytes(plan, model, x[:1], k)))
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        rows = out3[s:e]
        left = _structured_block(model, plan, x[s:e], rows, projection)
        if left:
            _reference_into(model, x[s:e], left, rows, projection, None)


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
        x = _check_x(x, dtype, device)
        with eval_mode(model):
            rec = Recorder(plan, x.shape[0])
            with rec, torch.no_grad():
                model(x)
            fallback |= rec.fallback_ids()
    return {e.name: "fallback" if id(e.param) in fallback else "structured" for e in entries}


def jacobian(
    model: nn.Module,
    x: Tensor,
    *,
    backend: JacobianBackend | str = "auto",
    param_names: str | Iterable[str] | None = None,
    projection: Tensor | None = None,
    chunk_size: int | None = None,
    force_eval: bool = False,
    out: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The per-sample parameter Jacobian of ``model`` at the inputs ``x``.

    Args:
        model: returns logits (N, C) for inputs (N, ...); must be in eval mode
            (BatchNorm on running statistics) unless ``force_eval``.
        x: inputs (N, ...), same dtype and device as the model's parameters.
        backend: ``"auto"`` (= structured), ``"structured"`` or ``"reference"``.
        param_names: restrict the columns to these parameters, one name or an iterable of
            names (kept in model order, see :func:`parameter_layout`); the structured backend then only does
            per-sample work for the layers that own them.
        projection: v of shape (C,): return the Jacobian of the single output
            v·f(x_n) instead, shape (N, P).
        chunk_size: samples per block; default from a memory budget (~256 MB of
            Jacobian per reference chunk, ~256 MB of working memory per structured
            block, which is also about the fastest block size on a CPU).
        force_eval: switch every module to eval mode for the call and restore each
            module's previous mode afterwards (also on error).
        out: preallocated contiguous result to write into (shape, dtype, device
            checked); every element is written.
        dtype: dtype of the result. The computation runs in the model's dtype.

    Returns:
        J of shape (N·C, P) with row ``n·C + c`` = ∂f_c(x_n)/∂θ, or (N, P) with a
        projection. Parameters and buffers are left untouched.
    """
    kind = _parse_backend(backend)
    entries = selected_entries(model, param_names)
    chunk = _check_chunk(chunk_size)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    check_mode(model, force_eval)
    cdtype, device = params_dtype_device(model, entries)
    x = _check_x(x, cdtype, device)
    with eval_mode(model):
        c = _probe(model, x)
        v = None if projection is None else check_projection(projection, c, cdtype, device)
        n, k = x.shape[0], (1 if v is not None else c)
        width = entries[-1].end
        result = _check_out(out, (n * k, width) if v is None else (n, width), dtype, device)
        out3 = result.view(n, k, width)
        x = x.detach()
        if kind is JacobianBackend.REFERENCE:
            _reference_into(model, x, entries, out3, v, chunk)
        else:
            _structured_into(model, x, entries, out3, v, chunk)
    return result


def _time_backends(model: str = "resnet20", n: int = 64, reps: int = 3, threads: int | None = None) -> dict[str, float]:
    """Best-of-``reps`` wall seconds of each backend on a zoo model (a timing aid, not a test).

    ``python -c 'from engine.ntk.jacobian import _time_backends as t; t("resnet20", 64)'``.
    Backends alternate within each repetition so that load from other processes hits
    both alike; J is freshly allocated each call, as a caller without ``out=`` sees it.
    """
    import time

    from engine.models import build_model

    if threads is not None:
        torch.set_num_threads(threads)
    net = build_model(model).eval()
    x = torch.randn(n, 3, 32, 32)
    kinds = (JacobianBackend.STRUCTURED, JacobianBackend.REFERENCE)
    for kind in kinds:
        jacobian(net, x[:2], backend=kind)  # warm-up: kernel selection, allocator
    best = dict.fromkeys(kinds, float("inf"))
    shape = ()
    for _ in range(reps):
        for kind in kinds:
            t0 = time.perf_counter()
            jac = jacobian(net, x, backend=kind)
            best[kind] = min(best[kind], time.perf_counter() - t0)
            shape = tuple(jac.shape)
            del jac
    s, r = best[JacobianBackend.STRUCTURED], best[JacobianBackend.REFERENCE]
    print(
        f"{model}, N={n}, {torch.get_num_threads()} threads, J {shape[0]} x {shape[1]:,}: "
        f"structured {s:.3f} s vs reference {r:.3f} s ({r / s:.2f}x)"
    )
    return {k.value: v for k, v in best.items()}
