"""Per-layer contraction strategy: each layer's Gram block by the cheaper of two ways.

* ``materialise``: form the layer's per-sample gradient columns (K·T·D·co multiply-adds per
  sample), then one Gram product of the columns ((n·K)²·P_layer for a full kernel);
* ``pairs``: the spatial-pair Gram of :mod:`engine.ntk.pairs`, T²·(D + K²·(co + 1)) per pair
  of samples, for a layer whose rule offers it (convolutions, Linear).

Both are counted in multiply-adds (MACs, one per multiply-add) and bytes moved (operands
and intermediates written once and read once; the kernel tile itself is common to both and
not counted). A strategy's estimated time is ``macs / mac_rate + bytes / byte_rate``; the
planner picks the smaller per layer. The floor of a kernel is the K backward-data passes
(K × the forward MACs of every conv/linear call whose input needs a gradient, per sample)
plus each layer's cheaper strategy; the forward pass is not counted. A symmetric kernel is
counted as its upper triangle, n(n+1)/2 pairs of samples (rows of K for a full kernel).

Layers without pair support (norms, embeddings, fallback parameters) and layers called more
than once per sample (their calls' pairs cross) are materialised; their formation is counted
only where a geometry is known.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError, parse_enum
from .pairs import KINDS, Geometry, two_stage
from .params import eval_mode, layer_of, selected_entries
from .rules import rule_for

__all__ = ["Contraction", "ContractionPlan", "Cost", "LayerCost", "choose", "materialise_cost", "pairs_cost",
           "plan", "strategy_for"]

# Machine balance used to weigh bytes against multiply-adds when no rates are given: a CPU
# core's float32 GEMM rate over its share of memory bandwidth is of this order.
DEFAULT_RATES = (50e9, 10e9)  # multiply-adds per second, bytes per second
# The Gram's inner dimension is split into pieces of at most this many columns (onepass).
_INNER = 8192


class Contraction(enum.StrEnum):
    AUTO = "auto"
    MATERIALISE = "materialise"
    PAIRS = "pairs"


@dataclass(frozen=True)
class Cost:
    """Multiply-adds and bytes moved; ``gemm``: the (m, k, n) of the product doing most of the
    multiply-adds (for rating them at the machine's measured rate for that shape)."""

    macs: int
    bytes: int
    gemm: tuple[int, int, int] | None = field(default=None, compare=False)

    def seconds(self, rates: tuple[float, float] = DEFAULT_RATES) -> float:
        return self.macs / rates[0] + self.bytes / rates[1]

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.bytes + other.bytes, self.gemm or other.gemm)


def _pairs_of_samples(kind: str, na: int, nb: int, sym: bool) -> int:
    if kind == "diagonal":
        return na
    return na * (na + 1) // 2 if sym else na * nb


def _formed(kind: str, na: int, nb: int, sym: bool) -> int:
    return na if sym or kind == "diagonal" else na + nb


def materialise_cost(kind: str, na: int, nb: int, k: int, sym: bool, columns: int, geom: Geometry | None,
                     itemsize: int = 4) -> Cost:
    """Forming ``columns`` per-sample gradient columns of a layer (geometry ``geom``, None: formation
    not counted) for the tile's samples, then their Gram. ``k``: rows per sample (1 for a pNTK)."""
    formed = _formed(kind, na, nb, sym)
    if kind == "full" and sym:  # the upper triangle of the (n·K)² rows
        gram = na * k * (na * k + 1) // 2 * columns
    else:
        gram = _pairs_of_samples(kind, na, nb, sym) * (k if kind == "traced" else k * k) * columns
    form = 0 if geom is None else formed * k * geom.forward_macs
    moved = 2 * formed * k * columns  # columns written, then read by the Gram
    if geom is not None:
        moved += 2 * formed * geom.t * geom.groups * geom.d + formed * k * geom.t * geom.groups * geom.co
    r = 1 if kind == "traced" else k
    gemm = (na * r, min(columns * (k // r), _INNER), (na if kind == "diagonal" else nb) * r)
    return Cost(gram + form, moved * itemsize, gemm)


def pairs_cost(kind: str, na: int, nb: int, k: int, sym: bool, geom: Geometry, itemsize: int = 4) -> Cost:
    """The spatial-pair Gram of one tile (engine.ntk.pairs.pair_gram): the input Gram A, the
    output-gradient Gram Γ (K² per pair of positions; K for the traced kernel) and the weighted sum."""
    pairs, formed = _pairs_of_samples(kind, na, nb, sym), _formed(kind, na, nb, sym)
    g, t2 = geom.groups, geom.t * geom.t
    if kind != "diagonal" and two_stage(kind, k, geom.t):  # no Γ: M = A g_j, then g_i · M
        macs = pairs * g * geom.t * (geom.t * geom.d + k * geom.t * geom.co + k * k * geom.co)
        moved = (2 * formed * geom.t * g * (geom.d + k * geom.co) * itemsize
                 + pairs * g * (4 * t2 + 4 * geom.t * k * geom.co) * 4)  # A twice, M written, moved, read
        gemm = ((1 if kind == "diagonal" else na) * geom.t, geom.d, nb * geom.t)
        return Cost(macs, moved, gemm)
    per_pos = geom.d + (k * geom.co + 1 if kind == "traced" else k * k * (geom.co + 1))
    gam = 1 if kind == "traced" else k * k
    moved = (2 * formed * geom.t * g * (geom.d + k * geom.co) * itemsize  # operands rearranged
             + 2 * pairs * g * t2 * (gam + 1) * 4)  # A and Γ (float32) written and read
    kk = 1 if kind == "traced" else k
    per_a = 1 if kind == "diagonal" else na
    per_b = 1 if kind == "diagonal" else nb
    gam_shape = (per_a * geom.t * kk, geom.co * (k // kk), per_b * geom.t * kk)
    a_shape = (per_a * geom.t, geom.d, per_b * geom.t)
    gemm = gam_shape if k * k * geom.co >= geom.d else a_shape
    return Cost(pairs * g * t2 * per_pos, moved, gemm)


def choose(mat: Cost, pairs: Cost | None, rates: tuple[float, float] = DEFAULT_RATES) -> str:
    """The cheaper strategy by estimated time (materialise on a tie or without pair support)."""
    if pairs is not None and pairs.seconds(rates) < mat.seconds(rates):
        return Contraction.PAIRS.value
    return Contraction.MATERIALISE.value


def strategy_for(contraction: Contraction, pairs_support, module: nn.Module, a: Tensor, y: Tensor, columns: int,
                 kind: str, na: int, nb: int, k: int, sym: bool, itemsize: int) -> str:
    """The driver's choice for one module call in an (na × nb) tile: ``materialise`` without pair
    support or when forced, ``pairs`` when forced, else the cheaper by :func:`choose`."""
    if pairs_support is None or contraction is Contraction.MATERIALISE:
        return Contraction.MATERIALISE.value
    if contraction is Contraction.PAIRS:
        return Contraction.PAIRS.value
    geom = pairs_support.geometry(module, a, y)
    return choose(materialise_cost(kind, na, nb, k, sym, columns, geom, itemsize),
                  pairs_cost(kind, na, nb, k, sym, geom, itemsize))


@dataclass(frozen=True)
class LayerCost:
    """One module's (or the fallback parameters') share of the kernel."""

    name: str
    layer: str  # module type, or "torch.func" for parameters without a rule
    columns: int
    t: int | None  # positions sharing the weight (None: no pair support)
    materialise: Cost
    pairs: Cost | None
    strategy: str

    @property
    def chosen(self) -> Cost:
        return self.pairs if self.strategy == Contraction.PAIRS.value else self.materialise


@dataclass(frozen=True)
class ContractionPlan:
    """:func:`plan`'s answer: per-layer strategies and costs for one tile, and the floor."""

    kernel: str
    n1: int
    n2: int | None
    k: int
    itemsize: int
    layers: list[LayerCost]
    backward_macs: int
    rates: tuple[float, float] = field(default=DEFAULT_RATES)

    @property
    def floor(self) -> Cost:
        """Backward-data passes plus every layer's chosen strategy."""
        return sum((lc.chosen for lc in self.layers), Cost(self.backward_macs, 0))

    @property
    def materialise_everywhere(self) -> Cost:
        return sum((lc.materialise for lc in self.layers), Cost(self.backward_macs, 0))

    def strategies(self) -> dict[str, str]:
        return {lc.name: lc.strategy for lc in self.layers}

    def table(self) -> str:
        """The plan as a text table (multiply-adds in G, bytes in MB)."""
        rows = [f"{'layer':<24} {'type':<12} {'T':>5} {'columns':>10} {'materialise GMAC':>17} "
                f"{'MB':>9} {'pairs GMAC':>11} {'MB':>9}  strategy"]
        for lc in self.layers:
            m, p = lc.materialise, lc.pairs
            pairs = f"{p.macs / 1e9:>11.3f} {p.bytes / 1e6:>9.1f}" if p else f"{'-':>11} {'-':>9}"
            rows.append(f"{lc.name:<24.24} {lc.layer:<12.12} {lc.t or '-':>5} {lc.columns:>10,} "
                        f"{m.macs / 1e9:>17.3f} {m.bytes / 1e6:>9.1f} {pairs}  {lc.strategy}")
        f, m = self.floor, self.materialise_everywhere
        tile = f"{self.n1} x {self.n1} (symmetric)" if self.n2 is None else f"{self.n1} x {self.n2}"
        rows += [f"kernel {self.kernel}, tile {tile} samples, {self.k} rows per sample",
                 f"backward-data passes: {self.backward_macs / 1e9:.3f} GMAC",
                 f"floor (backward + per-layer best): {f.macs / 1e9:.3f} GMAC, {f.bytes / 1e6:.1f} MB",
                 f"materialise everywhere: {m.macs / 1e9:.3f} GMAC, {m.bytes / 1e6:.1f} MB "
                 f"({m.macs / max(f.macs, 1):.2f}x the floor's multiply-adds)"]
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "n1": self.n1, "n2": self.n2, "k": self.k, "itemsize": self.itemsize,
                "rates": list(self.rates), "backward_macs": self.backward_macs,
                "floor": {"macs": self.floor.macs, "bytes": self.floor.bytes},
                "materialise_everywhere": {"macs": self.materialise_everywhere.macs,
                                           "bytes": self.materialise_everywhere.bytes},
                "layers": [{"name": lc.name, "type": lc.layer, "t": lc.t, "columns": lc.columns,
                            "strategy": lc.strategy,
                            "materialise": {"macs": lc.materialise.macs, "bytes": lc.materialise.bytes},
                            "pairs": None if lc.pairs is None else {"macs": lc.pairs.macs, "bytes": lc.pairs.bytes}}
                           for lc in self.layers]}


def _geometries(model: nn.Module, xs: tuple[Tensor, ...]) -> tuple[dict[int, list[Geometry]], int]:
    """Per module id, the geometry of each call on one sample; and the forward MACs of the calls
    whose input needs a gradient (what one backward-data pass costs)."""
    geoms: dict[int, list[Geometry]] = {}
    back = [0]

    def hook(m, args, y):
        rule = rule_for(m)
        a = args[0] if args else None
        if rule is None or rule.pairs is None or not isinstance(a, Tensor) or not isinstance(y, Tensor):
            return
        if not rule.supports(m, a, y):
            return
        g = rule.pairs.geometry(m, a, y)
        geoms.setdefault(id(m), []).append(g)
        if a.requires_grad:
            back[0] += g.forward_macs

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with eval_mode(model), torch.enable_grad():
            model(*(t[:1] for t in xs))
    finally:
        for h in handles:
            h.remove()
    return geoms, back[0]


def plan(model: nn.Module, x1, x2=None, *, kernel: str = "full", param_names: Iterable[str] | None = None,
         compute_dtype: torch.dtype | None = None, contraction: str | Contraction = "auto",
         rates: tuple[float, float] | None = None) -> ContractionPlan:
    """Each layer's strategy and predicted cost for the kernel of ``model`` at x1 (× x2) as one tile.

    ``x1``, ``x2``: inputs as for :func:`engine.ntk.entk` (a tensor (N, ...) or a tuple batched on
    dim 0; only the sizes and one sample are used). ``contraction``: ``auto`` (the cheaper per
    layer), or ``materialise`` / ``pairs`` forced wherever possible. ``rates``: (multiply-adds/s,
    bytes/s) weighing the two costs (default :data:`DEFAULT_RATES`).
    """
    kind = getattr(kernel, "value", kernel)
    if kind not in KINDS:
        raise ConfigError(f"kernel must be one of {', '.join(KINDS)}, got {kernel!r}")
    how = parse_enum(Contraction, contraction, "contraction")
    rates = rates or DEFAULT_RATES
    if kind == "diagonal" and x2 is not None:
        raise ConfigError("kernel='diagonal' has no cross-kernel: pass x2=None")
    xs1 = tuple(x1) if isinstance(x1, (tuple, list)) else (x1,)
    n1 = int(xs1[0].shape[0])
    n2 = None if x2 is None else int((x2[0] if isinstance(x2, (tuple, list)) else x2).shape[0])
    entries = selected_entries(model, param_names)
    if not entries:
        raise ConfigError(f"model {type(model).__name__} has no trainable parameters to take a kernel of")
    with torch.no_grad(), eval_mode(model):
        out = model(*(t[:1] for t in xs1))
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ConfigError(f"model {type(model).__name__} must return logits of shape (N, C)")
    k = 1 if kind == "pntk" else int(out.shape[1])
    itemsize = 2 if compute_dtype == torch.bfloat16 else torch.empty((), dtype=entries[0].param.dtype).element_size()
    geoms, back = _geometries(model, xs1)
    sym = x2 is None
    nb = n1 if sym else n2
    formed = _formed(kind, n1, nb, sym)
    modules = dict(model.named_modules())
    by_owner: dict[str, list] = {}
    for e in entries:
        by_owner.setdefault(e.name.rpartition(".")[0], []).append(e)
    layers = []
    for owner, es in by_owner.items():
        m = modules.get(owner)
        rule = rule_for(m) if m is not None else None
        columns = sum(e.end - e.start for e in es)
        calls = geoms.get(id(m), []) if rule is not None else []
        attrs = {e.name.rpartition(".")[2] for e in es}
        ruled = rule is not None and attrs <= set(rule.params)
        geom = calls[0] if len(calls) == 1 and ruled else None
        mat = materialise_cost(kind, n1, nb, k, sym, columns, geom, itemsize)
        if len(calls) > 1 and ruled:  # columns summed over the calls: each call's share is formed
            mat += Cost(sum(formed * k * g.forward_macs for g in calls), 0)
        pc = pairs_cost(kind, n1, nb, k, sym, geom, itemsize) if geom is not None else None
        if how is Contraction.AUTO:
            strategy = choose(mat, pc, rates)
        else:
            strategy = how.value if pc is not None else Contraction.MATERIALISE.value
        name = type(m).__name__ if ruled else "torch.func"
        key = owner or ",".join(layer_of(e.name) for e in es)  # top-level parameters: their own names
        layers.append(LayerCost(key, name, columns, geom.t if geom else None, mat, pc, strategy))
    return ContractionPlan(kind, n1, n2, k, itemsize, layers, formed * k * back, rates)
