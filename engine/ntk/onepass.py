"""One-pass eNTK: per-layer Jacobian chunks contracted straight into the kernel tiles.

For a block of inputs the model runs forward once (hooks record each ruled module's
input), and the K output-gradient backward passes run once (one backward per output, each
captured gradient copied into its ``(n, K, ...)`` slot as it is formed). Then, layer by layer, the
per-sample parameter gradients of that layer (the rules of ``engine/ntk/rules/``)
are formed for a chunk of its columns (output channels) and contracted into the tile
at once, ``tile += J_chunk,a J_chunk,bᵀ``: J never exists beyond one chunk, and no
forward or backward is repeated per parameter group. Small layers are packed side by
side into one chunk so the Gram products stay large.

* A conv or Linear may contribute by spatial pairs (engine/ntk/pairs.py) without forming its
  columns: ``contraction="auto"`` picks per layer the cheaper by engine/ntk/planner.py's cost
  model, ``"materialise"`` / ``"pairs"`` force one (materialise also skips closed forms).
* Parameters without a rule (or used where a rule cannot see them: tied weights, a
  parameter read outside its module) get their columns from ``torch.func``
  (vmap of jacrev), contracted the same way. ``entk_fn`` is this driver with a torch.func
  column source of its own (a function of a parameter dict) and its own memory model.
* Symmetric kernels compute only the upper-triangle tiles, and on the diagonal
  tiles only row strips of the upper triangle; the result is mirrored at the end.

Blocks: when all inputs' forward data fit the budget there is one block per input
set and everything is computed once; otherwise the outer block's data is kept and the
inner blocks are recomputed per tile (bounded memory, more passes).

Kernels (rows of the full kernel are ``n·K + c``):

* ``full``: (N1·C, N2·C);  ``traced``: (N1, N2), Σ_c of the C × C blocks;
* ``diagonal``: (N, C, C), the per-sample blocks only;
* ``pntk``: (N1, N2), the kernel of the single output Σ_c f_c / √C (one backward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from ..errors import ConfigError
from .budget import entk_row_blocks, entk_shares, per_sample_bytes, widest_unit
from .capture import Call, Plan, Recorder, make_plan, output_grads
from .contract import bf16_mode, contract, symmetrize
from .fallback import fill_columns
from .kinds import Implementation, KernelKind
from .pairs import pair_gram
from .params import Entry, owner_names
from .planner import Contraction, strategy_for
from .rules import LayerRule, reuse_workspace

__all__ = ["onepass_kernel"]

# A piece at least this wide fills a chunk alone: its Gram's inner dimension is long enough to
# run at the GEMM rate, and a chunk holding one piece is contiguous, so the rule's per-sample
# products land in it directly instead of through a copy.
_SOLO_COLS = 2048

# --------------------------------------------------------------------------- inputs


Inputs = Any  # entk: a tuple of tensors, the model called as model(*x); entk_fn: any pytree of tensors


def _call(model: nn.Module, x: Inputs) -> Tensor:
    return model(*x)


def _slice(x: Inputs, s: int, e: int) -> Inputs:
    return tree_map(lambda t: t[s:e], x)


def _size(x: Inputs) -> int:
    return int(tree_leaves(x)[0].shape[0])


# --------------------------------------------------------------------------- block data


@dataclass(eq=False)
class _Block:
    """Everything the columns of one block of inputs are formed from."""

    x: Inputs
    n: int
    calls: dict[int, list[Call]] = field(default_factory=dict)  # module id -> its calls, in order
    grads: dict[int, Tensor | None] = field(default_factory=dict)  # id(call) -> (n, K, *y.shape[1:])
    fallback: set[int] = field(default_factory=set)  # param ids whose columns come from torch.func


def _forward_backward(model: nn.Module, plan: Plan | None, x: Inputs, v: Tensor | None,
                      always_fallback: set[int], grad_dtype: torch.dtype | None = None) -> _Block:
    blk = _Block(x, _size(x))
    if plan is None:  # implementation="reference": every column from torch.func
        return blk
    rec = Recorder(plan, blk.n)
    with rec, torch.enable_grad():
        f = _call(model, x)
    blk.fallback = rec.fallback_ids() | always_fallback
    calls = rec.resolve(blk.fallback)
    if calls and f.requires_grad:
        own = [c for c in calls if c.base is None]
        # One backward per output, each gradient copied into its (n, K, ...) slot by a hook:
        # measured faster than one is_grads_batched backward, whose vmap fallbacks (no
        # batching rule for convolution_backward) stack the K results and then transpose them.
        gs = dict(zip(map(id, own), output_grads(f, [c.y for c in own], v, grad_dtype), strict=True))
        for c in calls:
            blk.grads[id(c)] = gs[id(c.base or c)]
            blk.calls.setdefault(id(c.module), []).append(c)
            if grad_dtype is not None and c.a.is_floating_point():
                c.a = c.a.to(grad_dtype)  # as the gradients: every use rounds the inputs to it too
    del f
    return blk


# --------------------------------------------------------------------------- column pieces


@dataclass(frozen=True)
class _Piece:
    """A group of kernel columns: a chunk of one module's structured columns, or fallback params."""

    key: str  # per-layer name
    width: int
    module: nn.Module | None = None  # structured: the module, else fallback
    slots: tuple[tuple[str, Entry], ...] = ()
    chunk: tuple[int, int] | None = None  # output-channel range of a chunked module
    entries: tuple[Entry, ...] = ()  # fallback params


def _module_pieces(m: nn.Module, rule: LayerRule, key: str, slots: list[tuple[str, Entry]],
                   max_cols: int, calls: list[Call]) -> list[_Piece]:
    width = sum(e.end - e.start for _, e in slots)
    out_ch = rule.channels(m)
    if width <= max_cols or out_ch is None or any(rule.channels(m, c.a) is None for c in calls):
        return [_Piece(key, width, m, tuple(slots))]
    per_ch = width // out_ch
    step = max(1, max_cols // per_ch)
    return [_Piece(key, (min(out_ch, o + step) - o) * per_ch, m, tuple(slots), (o, min(out_ch, o + step)))
            for o in range(0, out_ch, step)]


def _fill_structured(piece: _Piece, rule: LayerRule, blk: _Block, dest: Tensor) -> None:
    """Write the piece's columns of the block's rows into ``dest`` (n, K, width)."""
    m = piece.module
    calls = blk.calls.get(id(m), [])
    o = piece.chunk
    out_ch = rule.channels(m)
    dests, col = {}, 0
    for attr, e in piece.slots:
        w = e.end - e.start
        if o is not None:
            w = w // out_ch * (o[1] - o[0])
        dests[attr] = dest[:, :, col:col + w]
        col += w
    acc = False
    for c in calls:
        g = blk.grads[id(c)]
        if g is None:
            continue
        scale, a = c.scale, c.a
        if o is not None:
            g = g[:, :, o[0]:o[1]]
            scale = None if scale is None else scale[o[0]:o[1]]
        if dest.dtype == torch.bfloat16:
            # bfloat16 columns: the rule's products run on bfloat16 operands at the bfloat16 matmul
            # rate (float32 accumulation inside the GEMM), rounded once as they are written.
            g = g.to(dest.dtype)
            a = a.to(dest.dtype) if a.is_floating_point() else a
            scale = None if scale is None else scale.to(dest.dtype)
        rule.compute(m, a, g, dests, acc, scale)
        acc = True
    if not acc:  # never called, or its output does not reach f
        dest.zero_()


def _fill_fallback(s: _Setup, piece: _Piece, blk: _Block, dest: Tensor) -> None:
    """torch.func columns of the piece's parameters for the block's rows."""
    cols, col = [], 0
    for e in piece.entries:
        cols.append((col, col + e.end - e.start))
        col += e.end - e.start
    if s.columns is not None:
        s.columns(piece.entries, blk.x, dest, cols)
    else:
        fill_columns(s.model, piece.entries, blk.x, dest, s.v, cols)


# --------------------------------------------------------------------------- the engine


@dataclass
class _Setup:
    model: nn.Module
    entries: list[Entry]
    plan: Plan | None
    v: Tensor | None
    k: int
    kind: KernelKind
    per_layer: bool
    max_cols: int
    bf16: str | None
    dtype: torch.dtype
    names: dict[int, str]  # module id -> name
    owner_name: dict[int, str]  # param id -> per-layer key
    always_fallback: set[int]
    contraction: Contraction = Contraction.AUTO
    workspace: int = 0  # bound on one pair product's intermediates (the budget's chunk share)
    strategy: dict[int, str] = field(default_factory=dict)  # module id -> materialise | pairs
    columns: Callable | None = None  # the torch.func column source: (entries, x, dest, cols); None: the model's


def _pieces(s: _Setup, a: _Block, b: _Block) -> tuple[list[_Piece], list[tuple]]:
    """Column pieces common to blocks a and b, and the closed-form and spatial-pair contributions."""
    fb = a.fallback | b.fallback
    pieces: list[_Piece] = []
    closed: list[tuple] = []
    fallback_entries = [e for e in s.entries if s.plan is None or id(e.param) in fb]
    if s.plan is not None:
        for m in s.plan.modules:
            slots = [(attr, e) for attr, e in s.plan.slots[id(m)] if id(e.param) not in fb]
            if not slots:
                continue
            key = s.names[id(m)]
            ca, cb = a.calls.get(id(m), []), b.calls.get(id(m), [])
            rule = s.plan.rules[id(m)]
            one = len(ca) == 1 and len(cb) == 1 and a.grads[id(ca[0])] is not None and b.grads[id(cb[0])] is not None
            if one and id(m) not in s.strategy:  # decided on the first tile, kept for the kernel
                s.strategy[id(m)] = strategy_for(s.contraction, rule.pairs, m, ca[0].a, ca[0].y,
                                                 sum(e.end - e.start for _, e in slots), s.kind.value, a.n, b.n, s.k,
                                                 a is b, 2 if s.bf16 else torch.empty((), dtype=s.dtype).element_size())
            if one and s.strategy[id(m)] == Contraction.PAIRS.value:
                closed.append((key, m, slots, ca[0], cb[0], True))
                continue
            if (one and s.contraction is not Contraction.MATERIALISE and rule.closed_form_for(m, ca[0].a)
                    and rule.closed_form_for(m, cb[0].a)):
                closed.append((key, m, slots, ca[0], cb[0], False))
                continue
            pieces += _module_pieces(m, rule, key, slots, s.max_cols, ca + cb)
    by_key: dict[str, list[Entry]] = {}
    for e in fallback_entries:
        by_key.setdefault(s.owner_name[id(e.param)] if s.per_layer else "", []).append(e)
    for key, es in by_key.items():
        # Fallback columns are formed by torch.func per parameter group: chunk by parameter.
        group: list[Entry] = []
        for e in es:
            if group and sum(x.end - x.start for x in group) + e.end - e.start > s.max_cols:
                pieces.append(_Piece(key, sum(x.end - x.start for x in group), entries=tuple(group)))
                group = []
            group.append(e)
        pieces.append(_Piece(key, sum(x.end - x.start for x in group), entries=tuple(group)))
    return pieces, closed


def _tile(s: _Setup, outs: dict[str, Tensor], view: Callable[[Tensor], Tensor], a: _Block, b: _Block | None,
          bufs: list[Tensor]) -> None:
    """Accumulate tile (a, b) (b None: a symmetric diagonal tile, or a diagonal kernel) into ``outs``."""
    sym = b is None
    bb = a if sym else b
    pieces, closed = _pieces(s, a, bb)

    def out_for(key: str) -> Tensor:
        return view(outs[key if s.per_layer else ""])

    with torch.no_grad():
        for key, m, slots, ca, cb, pairs in closed:
            ga, gb = a.grads[id(ca)], bb.grads[id(cb)]
            if pairs:
                ops, attrs = s.plan.rules[id(m)].pairs.operands, {attr for attr, _ in slots}
                pb = (None, None) if sym else ops(m, cb.a, gb, cb.scale)
                pair_gram(out_for(key), s.kind.value, *ops(m, ca.a, ga, ca.scale), *pb, weight="weight" in attrs,
                          bias="bias" in attrs, mode=s.bf16, workspace_bytes=s.workspace)
                continue
            ga = ga if ca.scale is None else ga * ca.scale
            gb = gb if cb.scale is None else gb * cb.scale
            s.plan.rules[id(m)].closed_form(out_for(key), {attr for attr, _ in slots}, ca.a, ga, cb.a, gb, s.kind,
                                            s.bf16 is not None)
        _pack_and_contract(s, pieces, a, bb, sym, out_for, bufs)


def _pack_and_contract(s: _Setup, pieces: list[_Piece], a: _Block, bb: _Block, sym: bool,
                       out_for: Callable[[str], Tensor], bufs: list[Tensor]) -> None:
    # A layer formed a channel range at a time unfolds its input once per block, not per range.
    with reuse_workspace():
        # Pack consecutive narrow pieces (same key in per-layer mode) into chunks of ≤ max_cols columns.
        i = 0
        while i < len(pieces):
            group = [pieces[i]]
            width = pieces[i].width
            while (i + len(group) < len(pieces) and width + pieces[i + len(group)].width <= s.max_cols
                   and max(width, pieces[i + len(group)].width) < _SOLO_COLS
                   and (not s.per_layer or pieces[i + len(group)].key == group[0].key)):
                width += pieces[i + len(group)].width
                group.append(pieces[i + len(group)])
            i += len(group)
            # Native bfloat16: the columns are formed in bfloat16 (the Gram rounds them to it anyway).
            cdtype = torch.bfloat16 if s.bf16 == "native" else s.dtype
            ja = _chunk_buffer(bufs, 0, a.n, s.k, width, cdtype)
            _fill(s, group, a, ja)
            jb = None
            if not sym:
                jb = _chunk_buffer(bufs, 1, bb.n, s.k, width, cdtype)
                _fill(s, group, bb, jb)
            contract(out_for(group[0].key), ja, jb, s.kind, sym, s.bf16)


def _chunk_buffer(bufs: list[Tensor], slot: int, n: int, k: int, width: int, dtype: torch.dtype) -> Tensor:
    need = n * k * width
    if bufs[slot].numel() < need or bufs[slot].dtype != dtype:
        bufs[slot] = torch.empty(need, dtype=dtype, device=bufs[slot].device)
    return bufs[slot][:need].view(n, k, width)


def _fill(s: _Setup, group: list[_Piece], blk: _Block, dest: Tensor) -> None:
    col = 0
    for p in group:
        d = dest[:, :, col:col + p.width]
        if p.module is not None:
            _fill_structured(p, s.plan.rules[id(p.module)], blk, d)
        else:
            _fill_fallback(s, p, blk, d)
        col += p.width


def onepass_kernel(model: nn.Module | None, x1: Inputs, x2: Inputs | None, entries: list[Entry], *,
                   kind: KernelKind, k: int, v: Tensor | None, per_layer: bool, implementation: Implementation,
                   bf16: bool, dtype: torch.dtype, budget_bytes: int, progress: Callable | None = None,
                   contraction: Contraction = Contraction.AUTO, columns: Callable | None = None,
                   blocks: tuple[int, int, int] | None = None) -> Tensor | dict[str, Tensor]:
    """The kernel (or per-layer kernels) of ``model`` at ``x1`` (and ``x2``); see the module docstring.

    ``entries``: the selected parameters (columns); ``k``: rows per sample (C, or 1 with
    ``v``, the output projection); ``dtype``: computation and result dtype (float32 or
    float64); ``bf16``: bfloat16 column chunks (float32 accumulation): formed from bfloat16
    operands where the device multiplies bfloat16 natively, else rounded from float32.
    Inputs are checked by the caller (eval mode, dtypes, devices).

    ``entk_fn`` (``model`` None, reference) passes its torch.func column source ``columns(entries, x,
    dest, cols)`` (as :func:`~engine.ntk.fallback.fill_columns`) and ``blocks`` (budget.torch_func_blocks).
    """
    plan = None if implementation is Implementation.REFERENCE else make_plan(model, entries)
    names, owner, shared = owner_names(model, entries)
    mode = bf16_mode(bf16, entries[0].param.device)
    s = _Setup(model, entries, plan, v, k, kind, per_layer, 0, mode, dtype, names, owner, shared, contraction,
               columns=columns)
    n1, n2 = _size(x1), 0 if x2 is None else _size(x2)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if blocks is not None:
        b1, b2, cap = blocks
        s.max_cols = max(widest_unit(plan, entries), cap)
        s.workspace = entk_shares(budget_bytes).chunk
    else:
        b1, b2 = _entk_blocks(s, x1, n1, n2, budget_bytes, itemsize)
    return _run(s, x1, x2, n1, n2, b1, b2, progress)


def _entk_blocks(s: _Setup, x1: Inputs, n1: int, n2: int, budget_bytes: int, itemsize: int) -> tuple[int, int]:
    """Row blocks of x1 and x2 whose block data fit the budget's data share; sets ``s.max_cols``."""
    plan, entries, k, kind, model = s.plan, s.entries, s.k, s.kind, s.model
    per_sample = per_sample_bytes(plan, lambda: _call(model, _slice(x1, 0, 1)), k=k, width=entries[-1].end,
                                  itemsize=itemsize, fallback=s.always_fallback)
    widest = widest_unit(plan, entries)
    need = per_sample + k * widest * itemsize
    if budget_bytes < need:
        raise ConfigError(f"budget_bytes={budget_bytes:,} is below what one sample needs ({need:,} bytes: "
                          f"forward data plus the widest layer's {widest:,} columns × {k} outputs); raise it")
    shares = entk_shares(budget_bytes)
    chunk_bytes = s.workspace = shares.chunk  # a pair product's share too
    b1, b2 = entk_row_blocks(n1, n2, kind, per_sample, shares.data)
    rows = k * max(min(b1, n1), min(b2, n2) if n2 else 0)
    s.max_cols = max(widest, chunk_bytes // max(rows * itemsize, 1))
    return b1, b2


def _run(s: _Setup, x1: Inputs, x2: Inputs | None, n1: int, n2: int, b1: int, b2: int,
         progress: Callable | None) -> Tensor | dict[str, Tensor]:
    """Every tile of the kernel, block pair by block pair (see the module docstring)."""
    kind, k, dtype, per_layer, owner = s.kind, s.k, s.dtype, s.per_layer, s.owner_name
    device, entries = s.entries[0].param.device, s.entries

    m1 = n1 * (1 if kind in (KernelKind.TRACED, KernelKind.PNTK) else k)
    m2 = (n2 if x2 is not None else n1) * (1 if kind in (KernelKind.TRACED, KernelKind.PNTK) else k)
    shape = (n1, k, k) if kind is KernelKind.DIAGONAL else (m1, m2)
    keys = list(dict.fromkeys(owner[id(e.param)] for e in entries)) if per_layer else [""]  # model order
    outs = {key: torch.zeros(shape, dtype=dtype, device=device) for key in keys}
    r = 1 if kind in (KernelKind.TRACED, KernelKind.PNTK) else k
    bufs = [torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device)]

    def fb(x: Inputs) -> _Block:
        # Native bfloat16: the output gradients are kept in bfloat16 (every use rounds them to it).
        return _forward_backward(s.model, s.plan, x, s.v, s.always_fallback,
                                 torch.bfloat16 if s.bf16 == "native" else None)

    blocks1 = [(s0, min(n1, s0 + b1)) for s0 in range(0, n1, b1)]
    if kind is KernelKind.DIAGONAL:
        todo = [(i, None) for i in range(len(blocks1))]
    elif x2 is None:
        # Each row's column blocks run last to first, so the last one a row computes (i + 1)
        # is the next row's own block and is carried over instead of recomputed.
        m = len(blocks1)
        todo = [(i, j) for i in range(m) for j in (i, *range(m - 1, i, -1))]
    else:
        blocks2 = [(s0, min(n2, s0 + b2)) for s0 in range(0, n2, b2)]
        todo = [(i, j) for i in range(len(blocks1)) for j in range(len(blocks2))]
    cached2: _Block | None = None
    a = None
    cur = -1
    carry: tuple[int, _Block] | None = None  # (j, block j) kept for row j
    for i, j in (progress(todo) if progress else todo):
        if i != cur:
            a = None
            a, cur = carry[1] if carry is not None and carry[0] == i else fb(_slice(x1, *blocks1[i])), i
            carry = None
        p0, p1 = blocks1[i]
        if kind is KernelKind.DIAGONAL:
            _tile(s, outs, lambda o, p0=p0, p1=p1: o[p0:p1], a, None, bufs)
            continue
        if x2 is None:
            q0, q1 = blocks1[j]
            b = None if i == j else fb(_slice(x1, q0, q1))
            if b is not None and j == i + 1:
                carry = (j, b)
        else:
            q0, q1 = blocks2[j]
            if len(blocks2) == 1:
                cached2 = cached2 or fb(_slice(x2, q0, q1))
                b = cached2
            else:
                b = fb(_slice(x2, q0, q1))
        _tile(s, outs, lambda o, p0=p0, p1=p1, q0=q0, q1=q1: o[p0 * r:p1 * r, q0 * r:q1 * r], a, b, bufs)
        del b
    if x2 is None and kind is not KernelKind.DIAGONAL:
        for o in outs.values():
            symmetrize(o)
    return outs if per_layer else outs[""]
