"""Capture for the structured path: one forward with hooks on the modules that own the selected
parameters records each call's input and output (:class:`Recorder`), says which parameters must
fall back to torch.func (a call a rule cannot read, a parameter used outside its modules, an
in-place change after the call), and :func:`output_grads` forms the K per-sample output gradients
of every recorded call with one backward per output."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .params import Entry
from .rules import LayerRule, rule_for

__all__ = ["Call", "Plan", "Recorder", "make_plan", "output_grads"]


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


def output_grads(f: Tensor, ys: list[Tensor], projection: Tensor | None,
                 dtype: torch.dtype | None = None) -> list[Tensor | None]:
    """Per captured output y: the (n, K, *y.shape[1:]) gradients of the K scalar outputs.

    One backward per output c (samples are independent, so the gradient of Σ_n f_c(x_n)
    holds every sample's own gradient). A hook on each y copies its gradient into
    the stacked buffer while it is still in cache, instead of stacking afterwards.
    None for a y that does not reach f. ``dtype``: store the gradients in it (default y's; the
    hook's copy converts on the way, no extra pass).
    """
    n, c = f.shape
    k = 1 if projection is not None else c
    bufs = [torch.empty((n, k, *y.shape[1:]), dtype=dtype or y.dtype, device=y.device) for y in ys]
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
