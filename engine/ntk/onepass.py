"""One-pass eNTK: per-layer Jacobian chunks contracted straight into the kernel tiles.

For a block of inputs the model runs forward once (hooks record each ruled module's
input), and the K output-gradient backward passes run once (one backward per output, each
captured gradient copied into its ``(n, K, ...)`` slot as it is formed). Then, layer by layer, the
per-sample parameter gradients of that layer (the rules of ``engine/ntk/_layers.py``)
are formed for a chunk of its columns (output channels) and contracted into the tile
at once, ``tile += J_chunk,a J_chunk,bᵀ``: J never exists beyond one chunk, and no
forward or backward is repeated per parameter group. Small layers are packed side by
side into one chunk so the Gram products stay large.

* A layer applying one weight at T positions (conv, Linear) may instead contribute by
  spatial pairs (engine/ntk/pairs.py), Σ_{t,s} (a_a[t]·a_b[s]) (g_a[t]·g_b[s]), without
  forming its columns: ``contraction="auto"`` picks the cheaper per layer by the cost model
  of engine/ntk/planner.py (a Linear on (n, I) inputs, T = 1, always), ``"materialise"`` or
  ``"pairs"`` force one wherever possible.
* Parameters without a rule (or used where a rule cannot see them: tied weights, a
  parameter read outside its module) get their columns from ``torch.func``
  (vmap of jacrev), contracted the same way.
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

import enum
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from ..errors import ConfigError
from ._layers import LayerRule
from .gram import symmetrize
from .jacobian import Call, Entry, Plan, Recorder, layer_of, make_plan, output_grads
from .pairs import pair_gram
from .planner import Contraction, choose, materialise_cost, pairs_cost

__all__ = ["EntkKernel", "Implementation", "bf16_matrix_unit", "onepass_kernel"]


class EntkKernel(enum.StrEnum):
    FULL = "full"
    TRACED = "traced"
    DIAGONAL = "diagonal"
    PNTK = "pntk"


class Implementation(enum.StrEnum):
    """How per-sample gradients are formed: layer rules (structured) or torch.func for every column."""

    AUTO = "auto"
    STRUCTURED = "structured"
    REFERENCE = "reference"


# Row strips of a symmetric diagonal tile: each strip multiplies only the columns at
# and right of its first row. Strips narrower than this lose more to BLAS efficiency
# than they save.
_STRIP_ROWS = 128
# Longest inner dimension of one Gram product (see _gram_into).
_INNER = 8192
# Bound on one column-chunk buffer: a chunk is formed and then read by the Gram while still
# in the last-level cache, and a small reused buffer is not faulted in afresh for every
# chunk (this VM maps fresh memory slowly).
_CHUNK_BYTES = 32 << 20


@cache
def bf16_matrix_unit() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


# --------------------------------------------------------------------------- inputs


Inputs = tuple[Tensor, ...]


def _call(model: nn.Module, x: Inputs) -> Tensor:
    return model(*x)


def _slice(x: Inputs, s: int, e: int) -> Inputs:
    return tuple(t[s:e] for t in x)


def _size(x: Inputs) -> int:
    return int(x[0].shape[0])


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
                      always_fallback: set[int]) -> _Block:
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
        gs = dict(zip(map(id, own), output_grads(f, [c.y for c in own], v), strict=True))
        for c in calls:
            blk.grads[id(c)] = gs[id(c.base or c)]
            blk.calls.setdefault(id(c.module), []).append(c)
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


def _chunkable(m: nn.Module) -> int | None:
    """Output channels of a module whose columns split cleanly by output channel, else None."""
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1:
        return m.out_channels
    return None


def _module_pieces(m: nn.Module, key: str, slots: list[tuple[str, Entry]], max_cols: int) -> list[_Piece]:
    width = sum(e.end - e.start for _, e in slots)
    out_ch = _chunkable(m)
    if width <= max_cols or out_ch is None:
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
    out_ch = _chunkable(m)
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
        scale = c.scale
        if o is not None:
            g = g[:, :, o[0]:o[1]]
            scale = None if scale is None else scale[o[0]:o[1]]
        rule.compute(m, c.a, g, dests, acc, scale)
        acc = True
    if not acc:  # never called, or its output does not reach f
        dest.zero_()


def _fill_fallback(model: nn.Module, piece: _Piece, blk: _Block, dest: Tensor, v: Tensor | None) -> None:
    """torch.func columns of the piece's parameters for the block's rows."""
    params = {e.name: e.param.detach() for e in piece.entries}

    def single(p: dict[str, Tensor], xs: Inputs) -> Tensor:
        y = functional_call(model, p, tuple(t.unsqueeze(0) for t in xs))[0]
        return y if v is None else y @ v

    with torch.no_grad():
        if v is not None:
            jac = vmap(grad(single), in_dims=(None, 0))(params, blk.x)
            jac = {k: t.unsqueeze(1) for k, t in jac.items()}
        else:
            try:
                jac = vmap(jacrev(single), in_dims=(None, 0))(params, blk.x)
            except RuntimeError:
                # Nested vmap (samples x outputs) trips over a few batching rules (torch 2.14:
                # PReLU's backward); one vmap level per output works.
                cols = [vmap(grad(lambda p, xs, j=j: single(p, xs)[j]), in_dims=(None, 0))(params, blk.x)
                        for j in range(dest.shape[1])]
                jac = {name: torch.stack([col[name] for col in cols], dim=1) for name in params}
        col = 0
        for e in piece.entries:
            w = e.end - e.start
            dest[:, :, col:col + w].copy_(jac[e.name].reshape(blk.n, dest.shape[1], w))
            col += w


# --------------------------------------------------------------------------- contraction


@dataclass
class _Tile:
    kind: EntkKernel
    k: int
    sym: bool  # a diagonal tile of a symmetric kernel (a is b)
    bf16: str | None  # None, "emulate" (round to bf16, multiply in float32), "native"


def _round(t: Tensor, mode: str | None) -> Tensor:
    if mode == "emulate":
        return t.copy_(t.to(torch.bfloat16))
    if mode == "native":
        return t.to(torch.bfloat16)
    return t


def _mm_into(out: Tensor, a: Tensor, b: Tensor, mode: str | None) -> None:
    """out += a @ bᵀ, in float32 accumulation."""
    if mode == "native":
        if out.device.type == "cuda":
            out.add_(torch.mm(a, b.T, out_dtype=out.dtype))
        else:
            out.add_(torch.mm(a, b.T))
        return
    out.addmm_(a, b.T)


def _gram_into(out: Tensor, a: Tensor, b: Tensor, sym: bool, mode: str | None) -> None:
    """out (ra, rb) += a (ra, w) @ b (rb, w)ᵀ; for ``sym`` (a is b) only the upper-triangle strips.

    The inner dimension is split into pieces of at most ``_INNER`` columns: this CPU's
    BLAS sums a long inner dimension of a small product in one running sum (float32
    error ~1e-5 at 10⁵ columns, against ~1e-7 when split).
    """
    w = a.shape[1]
    if w > _INNER:
        for c0 in range(0, w, _INNER):
            _gram_into(out, a[:, c0:c0 + _INNER], b[:, c0:c0 + _INNER], sym, mode)
        return
    rows = a.shape[0]
    if not sym or rows < 2 * _STRIP_ROWS:
        _mm_into(out, a, b, mode)
        return
    strips = rows // _STRIP_ROWS
    edges = [round(i * rows / strips) for i in range(strips + 1)]
    for r0, r1 in itertools.pairwise(edges):
        _mm_into(out[r0:r1, r0:], a[r0:r1], b[r0:], mode)


def _contract(out: Tensor, ja: Tensor, jb: Tensor | None, t: _Tile) -> None:
    """Add the columns' contribution to the tile ``out``; ja (na, K, w), jb (nb, K, w) or None (= ja)."""
    ja = _round(ja, t.bf16)
    jb = ja if jb is None else _round(jb, t.bf16)
    na, k, w = ja.shape
    if t.kind is EntkKernel.DIAGONAL:
        for c0 in range(0, w, _INNER):  # split inner dimension, as in _gram_into
            p = ja[:, :, c0:c0 + _INNER]
            if t.bf16 == "native":
                out.add_(torch.bmm(p, p.transpose(1, 2)))
            else:
                out.baddbmm_(p, p.transpose(1, 2))
    elif t.kind is EntkKernel.TRACED:
        _gram_into(out, ja.reshape(na, k * w), jb.reshape(jb.shape[0], k * w), t.sym, t.bf16)
    else:
        _gram_into(out, ja.reshape(na * k, w), jb.reshape(-1, w), t.sym, t.bf16)


def _pair_contribution(s: _Setup, out: Tensor, m: nn.Module, slots, ca: Call, ga: Tensor, cb: Call | None,
                      gb: Tensor | None) -> None:
    """A layer's block by spatial pairs (engine/ntk/pairs.py); ``cb`` None: b is a (symmetric tile)."""
    ops = s.plan.rules[id(m)].pairs.operands
    pa, qa = ops(m, ca.a, ga, ca.scale)
    pb, qb = (None, None) if cb is None else ops(m, cb.a, gb, cb.scale)
    attrs = {attr for attr, _ in slots}
    pair_gram(out, s.kind.value, pa, qa, pb, qb, weight="weight" in attrs, bias="bias" in attrs, mode=s.bf16,
              workspace_bytes=s.workspace)


def _strategy(s: _Setup, m: nn.Module, slots, call: Call, na: int, nb: int, sym: bool) -> str:
    """materialise or pairs for module m, decided once per kernel from its first tile (engine/ntk/planner.py)."""
    rule = s.plan.rules[id(m)]
    if rule.pairs is None or s.contraction is Contraction.MATERIALISE:
        return Contraction.MATERIALISE.value
    if s.contraction is Contraction.PAIRS:
        return Contraction.PAIRS.value
    if id(m) not in s.strategy:
        geom = rule.pairs.geometry(m, call.a, call.y)
        columns = sum(e.end - e.start for _, e in slots)
        itemsize = 2 if s.bf16 else torch.empty((), dtype=s.dtype).element_size()
        kind = s.kind.value
        s.strategy[id(m)] = choose(materialise_cost(kind, na, nb, s.k, sym, columns, geom, itemsize),
                                   pairs_cost(kind, na, nb, s.k, sym, geom, itemsize))
    return s.strategy[id(m)]


# --------------------------------------------------------------------------- the engine


@dataclass
class _Setup:
    model: nn.Module
    entries: list[Entry]
    plan: Plan | None
    v: Tensor | None
    k: int
    kind: EntkKernel
    per_layer: bool
    max_cols: int
    bf16: str | None
    dtype: torch.dtype
    names: dict[int, str]  # module id -> name
    owner_name: dict[int, str]  # param id -> per-layer key
    always_fallback: set[int]
    contraction: Contraction = Contraction.AUTO
    workspace: int = 32 << 20  # bound on one pair product's intermediates
    strategy: dict[int, str] = field(default_factory=dict)  # module id -> chosen under auto


def _owner_names(model: nn.Module, entries: list[Entry]) -> tuple[dict[int, str], dict[int, str], set[int]]:
    names = {id(m): n for n, m in model.named_modules()}
    holders: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(mname)
    owner = {}
    shared = set()
    for e in entries:
        owner[id(e.param)] = layer_of(e.name)
        if len(set(holders.get(id(e.param), []))) > 1:
            shared.add(id(e.param))  # tied: the columns sum over holders, which the fallback does
    return names, owner, shared


def _pieces(s: _Setup, a: _Block, b: _Block) -> tuple[list[_Piece], list[tuple]]:
    """Column pieces common to blocks a and b, and the layers contracted by spatial pairs."""
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
            # One call per block: its Gram block may come from spatial pairs instead of columns.
            if (len(ca) == 1 and len(cb) == 1 and a.grads[id(ca[0])] is not None
                    and b.grads[id(cb[0])] is not None
                    and _strategy(s, m, slots, ca[0], a.n, b.n, a is b) == Contraction.PAIRS.value):
                closed.append((key, m, slots, ca[0], cb[0]))
                continue
            pieces += _module_pieces(m, key, slots, s.max_cols)
    by_key: dict[str, list[Entry]] = {}
    for e in fallback_entries:
        by_key.setdefault(s.owner_name[id(e.param)] if s.per_layer else "", []).append(e)
    for key, es in by_key.items():
        width = sum(e.end - e.start for e in es)
        # Fallback columns are formed by torch.func per parameter group: chunk by parameter.
        group: list[Entry] = []
        for e in es:
            if group and sum(x.end - x.start for x in group) + e.end - e.start > s.max_cols:
                pieces.append(_Piece(key, sum(x.end - x.start for x in group), entries=tuple(group)))
                group = []
            group.append(e)
        pieces.append(_Piece(key, sum(x.end - x.start for x in group), entries=tuple(group)))
        del width
    return pieces, closed


def _tile(s: _Setup, outs: dict[str, Tensor], view: Callable[[Tensor], Tensor], a: _Block, b: _Block | None,
          bufs: list[Tensor]) -> None:
    """Accumulate tile (a, b) (b None: a symmetric diagonal tile, or a diagonal kernel) into ``outs``."""
    sym = b is None
    bb = a if sym else b
    t = _Tile(s.kind, s.k, sym, s.bf16)
    pieces, closed = _pieces(s, a, bb)

    def out_for(key: str) -> Tensor:
        return view(outs[key if s.per_layer else ""])

    with torch.no_grad():
        for key, m, slots, ca, cb in closed:
            _pair_contribution(s, out_for(key), m, slots, ca, a.grads[id(ca)], None if sym else cb,
                               None if sym else bb.grads[id(cb)])
        # Pack consecutive pieces (same key in per-layer mode) into one chunk of ≤ max_cols columns.
        i = 0
        while i < len(pieces):
            group = [pieces[i]]
            width = pieces[i].width
            while (i + len(group) < len(pieces) and width + pieces[i + len(group)].width <= s.max_cols
                   and (not s.per_layer or pieces[i + len(group)].key == group[0].key)):
                width += pieces[i + len(group)].width
                group.append(pieces[i + len(group)])
            i += len(group)
            ja = _chunk_buffer(bufs, 0, a.n, s.k, width, s.dtype)
            _fill(s, group, a, ja)
            jb = None
            if not sym:
                jb = _chunk_buffer(bufs, 1, bb.n, s.k, width, s.dtype)
                _fill(s, group, bb, jb)
            _contract(out_for(group[0].key), ja, jb, t)


def _chunk_buffer(bufs: list[Tensor], slot: int, n: int, k: int, width: int, dtype: torch.dtype) -> Tensor:
    need = n * k * width
    if bufs[slot].numel() < need:
        bufs[slot] = torch.empty(need, dtype=dtype, device=bufs[slot].device)
    return bufs[slot][:need].view(n, k, width)


def _fill(s: _Setup, group: list[_Piece], blk: _Block, dest: Tensor) -> None:
    col = 0
    for p in group:
        d = dest[:, :, col:col + p.width]
        if p.module is not None:
            _fill_structured(p, s.plan.rules[id(p.module)], blk, d)
        else:
            _fill_fallback(s.model, p, blk, d, s.v)
        col += p.width


def _per_sample_bytes(s: _Setup, x1: Inputs) -> int:
    """Rough memory per input sample of one block's data (graph, patches, stored gradients)."""
    if s.plan is None:
        return max(1, 4 * s.k * s.entries[-1].end)  # torch.func's per-sample Jacobian
    rec = Recorder(s.plan, 1)
    with rec, torch.enable_grad():  # with a graph, so that resolve() sees who borrows a gradient
        _call(s.model, x1)
    own = {id(c) for c in rec.resolve(rec.fallback_ids() | s.always_fallback) if c.base is None}
    # Held per block: the graph (~2 activations per hooked output) and the K output gradients
    # of the calls that keep their own (a conv feeding only a BatchNorm borrows the BatchNorm's);
    # transient, one layer at a time: the unfolded patches and the batched backward's K
    # gradients of the widest activation (twice: input and output of an op).
    held = sum((2 + (s.k if id(c) in own else 0)) * c.y.numel() for c in rec.calls)
    patches = max((math.prod(int(d) for d in getattr(c.module, "kernel_size", (1,))) * c.a.numel()
                   for c in rec.calls), default=0)
    widest = max((c.y.numel() for c in rec.calls), default=0)
    total = held + patches + 2 * s.k * widest
    return max(1, total * 4)


def onepass_kernel(model: nn.Module, x1: Inputs, x2: Inputs | None, entries: list[Entry], *,
                   kind: EntkKernel, k: int, v: Tensor | None, per_layer: bool, implementation: Implementation,
                   bf16: bool, dtype: torch.dtype, budget_bytes: int,
                   progress: Callable | None = None,
                   contraction: Contraction = Contraction.AUTO) -> Tensor | dict[str, Tensor]:
    """The kernel (or per-layer kernels) of ``model`` at ``x1`` (and ``x2``); see the module docstring.

    ``entries``: the selected parameters (columns); ``k``: rows per sample (C, or 1 with
    ``v``, the output projection); ``dtype``: computation and result dtype (float32 or
    float64); ``bf16``: round the column chunks to bfloat16 (float32 accumulation).
    Inputs are checked by the caller (eval mode, dtypes, devices).
    """
    device = entries[0].param.device
    plan = None if implementation is Implementation.REFERENCE else make_plan(model, entries)
    names, owner, shared = _owner_names(model, entries)
    mode = None
    if bf16:
        mode = "native" if device.type == "cuda" or bf16_matrix_unit() else "emulate"
    s = _Setup(model, entries, plan, v, k, kind, per_layer, 0, mode, dtype, names, owner, shared, contraction)

    n1 = _size(x1)
    n2 = 0 if x2 is None else _size(x2)
    per_sample = _per_sample_bytes(s, _slice(x1, 0, 1))
    itemsize = torch.empty((), dtype=dtype).element_size()
    widest = _widest_unit(plan, entries)
    need = per_sample + k * widest * itemsize
    if budget_bytes < need:
        raise ConfigError(f"budget_bytes={budget_bytes:,} is below what one sample needs ({need:,} bytes: "
                          f"forward data plus the widest layer's {widest:,} columns × {k} outputs); raise it")
    # The two column-chunk buffers take at most a quarter of the budget each (and no more
    # than _CHUNK_BYTES); the block data gets the rest: all inputs in one block if they fit,
    # else two blocks (a row block and a column block) of equal size.
    chunk_bytes = min(budget_bytes // 4, _CHUNK_BYTES)
    s.workspace = chunk_bytes  # a pair product's intermediates take a chunk buffer's share
    data_bytes = budget_bytes - 2 * chunk_bytes
    total = n1 + n2 if kind is not EntkKernel.DIAGONAL else n1
    if total * per_sample <= data_bytes:
        b1, b2 = n1, max(n2, 1)
    else:
        b1 = b2 = max(1, data_bytes // 2 // per_sample)
    rows = k * max(min(b1, n1), min(b2, n2) if n2 else 0)
    s.max_cols = max(widest, chunk_bytes // max(rows * itemsize, 1))

    m1 = n1 * (1 if kind in (EntkKernel.TRACED, EntkKernel.PNTK) else k)
    m2 = (n2 if x2 is not None else n1) * (1 if kind in (EntkKernel.TRACED, EntkKernel.PNTK) else k)
    shape = (n1, k, k) if kind is EntkKernel.DIAGONAL else (m1, m2)
    keys = sorted({owner[id(e.param)] for e in entries}) if per_layer else [""]
    outs = {key: torch.zeros(shape, dtype=dtype, device=device) for key in keys}
    r = 1 if kind in (EntkKernel.TRACED, EntkKernel.PNTK) else k
    bufs = [torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device)]

    def fb(x: Inputs) -> _Block:
        return _forward_backward(model, plan, x, v, shared)

    blocks1 = [(s0, min(n1, s0 + b1)) for s0 in range(0, n1, b1)]
    if kind is EntkKernel.DIAGONAL:
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
        if kind is EntkKernel.DIAGONAL:
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
    if x2 is None and kind is not EntkKernel.DIAGONAL:
        for o in outs.values():
            symmetrize(o)
    return outs if per_layer else outs[""]


def _widest_unit(plan: Plan | None, entries: list[Entry]) -> int:
    """The most columns that must be formed together: one output channel of a chunkable layer
    (its weight row and bias), a whole other module, a whole fallback parameter."""
    widest = max(e.end - e.start for e in entries)
    if plan is None:
        return widest
    chunked: set[int] = set()
    units = []
    for m in plan.modules:
        out_ch = _chunkable(m)
        width = sum(e.end - e.start for _, e in plan.slots[id(m)])
        if out_ch is not None:
            units.append(width // out_ch)
            chunked.update(id(e.param) for _, e in plan.slots[id(m)])
        else:
            units.append(width)
            chunked.update(id(e.param) for _, e in plan.slots[id(m)])
    units += [e.end - e.start for e in entries if id(e.param) not in chunked]
    return max(units) if units else widest
