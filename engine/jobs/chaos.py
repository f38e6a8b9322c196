"""The Chaos Effect experiment (arXiv 2505.13900, Fig. 3) as one resumable job.

One base run; at each t₀ a member is spawned from the base with a perturbation of
size ε; one control member is spawned with ε = 0 at the earliest t₀. All train on
the same batches. At each t₁ every spawned member is compared with the base:
parameter dissimilarity, loss barrier on fixed train and test subsets, prediction
disagreement. The control's numbers are the run's noise floor (exactly 0 in
deterministic mode on the CPU).

Reference members (``independent``, ``spawn_t0``): an ``independent`` run from another
initialisation on the base's data order (two basins by construction: the scale of "another
basin" for the barrier), and ``spawn`` copies of the base at chosen t₀ trained on another data
order (Frankle et al. 2020's stability test; loop strategy only). They are compared with the
base at every t₁ like the twins; the test error barrier is recorded beside the loss barrier.

Divergence traces: every ``trace_every`` steps each spawned member's distance to the
base (L2, 1 − cos and its own norm) is recorded on the device into a preallocated
tensor (:meth:`~engine.twins.Fleet.trace_into`, no host synchronisation) and written
with each t₁ unit; :mod:`engine.analysis.chaos` turns them into growth curves and
finite-time growth rates.

Output: an ``entk-chaos`` HDF5 file (docs/FORMAT.md); unit u is the metrics at
``t1[u]``; the whole fleet state at the last completed t₁ is kept in one of two
alternating slots, so a killed job resumes bit-identically.

Under ``torchrun`` (``WORLD_SIZE > 1``) the members are shared over the ranks: member i ≥ 1
(the control, then the twins in t₀ order) goes to rank ``(i - 1) % world``, on
``cuda:LOCAL_RANK`` or the CPU. Every rank trains its own copy of the base on the same batch
stream, so each member sees the SGD noise it sees in one process. At each t₁ the ranks hand
their members' metrics, trace columns and packed states to rank 0 (over gloo), and rank 0
alone writes the file, exactly as one process does. The members are stepped one by one
(``loop``; ``auto`` picks it under torchrun, ``vmap`` is refused: a batched kernel's rounding
depends on how many members it batches), so the file is bit-identical to a one-process
``loop`` run, and a rerun after any rank died resumes at the last completed t₁.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import BatchStream, Dataset, normalize
from ..determinism import set_deterministic
from ..errors import ConfigError
from ..metrics import disagreement, loss_barrier, param_dissimilarity
from ..models import build_model
from ..progress import progress as progress_bar
from ..store import ChaosStore
from ..train import TrainConfig, prepare_data
from ..twins import NORMS, Fleet, MemberSpec, Perturbation, Strategy, make_fleet, resolve_strategy
from .chaos_checks import MIN_CHANGED_FRACTION, ChaosDivergedError, check_finite, check_perturbation, check_same_data
from .chaos_result import FIELDS, FIELDS_V1, TRACE_FIELDS, ChaosResult, used_of
from .distributed import Dist, rank_device

__all__ = ["FIELDS", "MIN_CHANGED_FRACTION", "ChaosConfig", "ChaosDivergedError", "ChaosResult", "load_chaos",
           "run_chaos", "write_summary"]

# Seed offsets of the reference members: the independent run's initialisation is built under
# train.seed + INDEPENDENT_SEED, spawn i's data order is the stream of stream_seed + SPAWN_SEED + i
# (both far from the small seeds a study repeats over).
INDEPENDENT_SEED = 10_007
SPAWN_SEED = 20_011


@dataclass
class ChaosConfig:
    """The chaos grid; ``train.steps`` must cover the largest t₁."""

    train: TrainConfig
    t0: list[int]
    t1: list[int]
    eps: float = 1e-7
    norm: str = "l2"
    perturb_seed: int = 0
    weights_only: bool = False
    allow_zero: bool = False
    eval_train: int = 1000
    eval_test: int = 1000
    eval_seed: int = 0
    alphas: int = 11
    bn: str = "interpolate"
    strategy: str = "auto"
    trace_every: int = 10
    independent: bool = False
    spawn_t0: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def validate(self) -> ChaosConfig:
        self.train.validate()
        self.t0, self.t1 = sorted(set(int(t) for t in self.t0)), sorted(set(int(t) for t in self.t1))
        if not self.t0 or not self.t1:
            raise ConfigError("need at least one t0 and one t1")
        if self.t1[-1] < self.t0[0]:
            raise ConfigError(f"every t1 {self.t1} is before the first t0 {self.t0[0]}: nothing to compare")
        steps = self.train.steps
        bad = [t for t in self.t0 + self.t1 if not 0 <= t <= steps]
        if bad:
            raise ConfigError(f"iterations {bad[:5]} are outside the run [0, {steps}] (--steps)")
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise ConfigError(f"eps must be finite and > 0, got {self.eps}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.alphas < 2:
            raise ConfigError(f"alphas must be >= 2, got {self.alphas}")
        if self.bn not in ("interpolate", "recompute"):
            raise ConfigError(f"bn must be 'interpolate' or 'recompute', got {self.bn!r}")
        if self.eval_train < 1 or self.eval_test < 1:
            raise ConfigError("eval_train and eval_test must be >= 1")
        if isinstance(self.trace_every, bool) or int(self.trace_every) != self.trace_every or self.trace_every < 0:
            raise ConfigError(f"trace_every must be an integer >= 0 (0: no traces), got {self.trace_every!r}")
        self.spawn_t0 = sorted(set(int(t) for t in self.spawn_t0))
        late = [t for t in self.spawn_t0 if not 0 <= t <= self.t1[-1]]
        if late:
            raise ConfigError(f"spawn t0 {late[:5]} must lie in [0, last t1 = {self.t1[-1]}] (--spawn-t0)")
        return self

    def trace_iterations(self) -> list[int]:
        """Iterations of the divergence trace: every ``trace_every`` steps from 0, and every t0 and t1."""
        if not self.trace_every:
            return []
        end = self.t1[-1]
        return sorted(set(range(0, end + 1, self.trace_every)) | set(self.t1) | {t for t in self.t0 if t <= end})

    def members(self) -> list[MemberSpec]:
        specs = [MemberSpec("base", None), MemberSpec("control", self.t0[0], None)]
        for i, t in enumerate(self.t0):
            p = Perturbation(self.eps, self.norm, self.perturb_seed + i, self.weights_only)
            specs.append(MemberSpec(f"t0={t}", t, p))
        if self.independent:
            specs.append(MemberSpec("independent", 0, init_seed=self.train.seed + INDEPENDENT_SEED))
        for i, t in enumerate(self.spawn_t0):
            specs.append(MemberSpec(f"spawn t0={t}", t, data_seed=self.train.stream_seed + SPAWN_SEED + i))
        return specs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d


def _state_layout(fleet: Fleet) -> list[tuple[str, str, tuple, torch.dtype]]:
    st, mom = fleet.state(0), fleet.momentum(0)
    return ([("state", n, tuple(v.shape), v.dtype) for n, v in st.items()]
            + [("momentum", n, tuple(v.shape), v.dtype) for n, v in mom.items()])


def _pack(fleet: Fleet, k: int) -> torch.Tensor:
    st, mom = fleet.state(k), fleet.momentum(k)
    parts = [v.detach().reshape(-1).cpu().view(torch.uint8) for v in list(st.values()) + list(mom.values())]
    return torch.cat(parts)


def _unpack(buf: torch.Tensor, layout) -> tuple[dict, dict]:
    st, mom, off = {}, {}, 0
    for kind, name, shape, dtype in layout:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        t = buf[off:off + n].clone().view(dtype).reshape(shape)
        (st if kind == "state" else mom)[name] = t
        off += n
    return st, mom


def _eval_sizes(ds: Dataset, cfg: ChaosConfig, quiet: bool) -> tuple[int, int]:
    """The metric subset sizes, clamped to the data; a clamp is said, and the used sizes recorded."""
    n_tr, n_te = min(cfg.eval_train, len(ds.y_train)), min(cfg.eval_test, len(ds.y_test))
    if (n_tr, n_te) != (cfg.eval_train, cfg.eval_test) and not quiet:
        print(f"entk chaos: note: the metric subsets use {n_tr} train / {n_te} test images (asked for "
              f"{cfg.eval_train} / {cfg.eval_test}; the data has {len(ds.y_train)} / {len(ds.y_test)})",
              file=sys.stderr)
    return n_tr, n_te


def _eval_sets(ds: Dataset, n_tr: int, n_te: int, cfg: ChaosConfig, device) -> dict:
    sub = ds.subset(n_tr, n_te, seed=cfg.eval_seed)
    return {"train": (normalize(sub.x_train.to(device), ds.mean, ds.std), sub.y_train.to(device)),
            "test": (normalize(sub.x_test.to(device), ds.mean, ds.std), sub.y_test.to(device))}


def _measure(model, base: dict, other: dict, sets: dict, cfg: ChaosConfig) -> list[float]:
    d = param_dissimilarity(model, base, other)
    bn_data = sets["train"][0] if cfg.bn == "recompute" else None
    bt = loss_barrier(model, base, other, *sets["train"], alphas=cfg.alphas, bn=cfg.bn, bn_data=bn_data)
    bs = loss_barrier(model, base, other, *sets["test"], alphas=cfg.alphas, bn=cfg.bn, bn_data=bn_data)
    dg = disagreement(model, base, other, *sets["test"])
    return [d["dissimilarity"], d["l2"], d["rel_l2"], bt["barrier"], bs["barrier"], dg["disagreement"],
            dg["acc_a"], dg["acc_b"], bs["error_barrier"]]


def run_chaos(cfg: ChaosConfig, out: str | Path, *, dataset: Dataset | None = None,
              device: str | torch.device = "cpu", overwrite: bool = False, quiet: bool = False,
              cache_dir=None) -> ChaosResult:
    """Run (or resume) the chaos grid into ``out``.

    Under torchrun the members are shared over the ranks, each rank training its own copy of the
    base (module docstring); every rank returns the whole result.
    """
    cfg.validate()
    with Dist() as d:
        return _run_chaos(d, cfg, out, dataset=dataset, device=device, overwrite=overwrite, quiet=quiet,
                          cache_dir=cache_dir)


def _reference_strategy(strategy: str, specs: list[MemberSpec], dev: torch.device, quiet: bool) -> str:
    """Spawn members train on their own batches, which only the loop strategy steps: ``auto`` falls
    back to it (said once), an explicit ``vmap`` is refused."""
    if not any(s.kind == "spawn" for s in specs) or resolve_strategy(strategy, dev) is not Strategy.VMAP:
        return strategy
    if strategy != Strategy.AUTO.value:
        raise ConfigError("spawn references (--spawn-t0) train on their own data order, which --strategy vmap "
                          "cannot batch: use --strategy loop (or auto)")
    if not quiet:
        print("entk chaos: note: spawn references train on their own data order: stepping the members one by one "
              "(strategy loop) instead of vmap", file=sys.stderr)
    return Strategy.LOOP.value


def _references(specs: list[MemberSpec], ds: Dataset, tcfg: TrainConfig, dev: torch.device) -> tuple[dict, dict]:
    """The batch streams of this rank's spawn members and the initial states of its independent ones
    (fleet index -> stream / state); the global RNG is left as it was."""
    streams, inits = {}, {}
    for j, spec in enumerate(specs):
        if spec.data_seed is not None:
            streams[j] = BatchStream.from_dataset(ds, "train", batch_size=tcfg.batch_size, seed=spec.data_seed,
                                                  augment=tcfg.augment, device=dev)
        if spec.init_seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.init_seed)
                net = build_model(tcfg.model, num_classes=ds.num_classes).to(dev)
            inits[j] = {n: v.detach().clone() for n, v in net.state_dict().items()}
    return streams, inits


def _sharded_strategy(strategy: str, k: int, d: Dist, dev: torch.device) -> str:
    """The fleet strategy of a rank's share of the members (one process: ``strategy`` as given)."""
    if d.world == 1:
        return strategy
    if d.world > k - 1:
        raise ConfigError(f"the chaos grid has {k - 1} members (the control and {k - 2} perturbed twins) to share "
                          f"over {d.world} ranks: launch at most {k - 1} processes")
    if resolve_strategy(strategy, dev) is Strategy.VMAP:
        if strategy != Strategy.AUTO.value:
            raise ConfigError("--strategy vmap batches the members of a fleet into one kernel, whose rounding "
                              "depends on how many are batched, so a run sharded over ranks would not be "
                              "bit-identical to one process: use --strategy loop (auto picks it under torchrun)")
        return Strategy.LOOP.value
    return strategy


def _run_chaos(d: Dist, cfg: ChaosConfig, out, *, dataset, device, overwrite, quiet, cache_dir) -> ChaosResult:
    dev = torch.device(device) if d.world == 1 else rank_device(device, d)
    tcfg = cfg.train
    specs = cfg.members()
    k = len(specs)
    # Member i >= 1 is rank (i - 1) % world's; every rank trains its own copy of the base, member 0.
    local = [0] + [i for i in range(1, k) if d.owns(i - 1)]
    lspecs = [specs[i] for i in local]
    strategy = _sharded_strategy(cfg.strategy, k, d, dev)
    set_deterministic(tcfg.deterministic)
    ds = dataset if dataset is not None else prepare_data(tcfg, cache_dir=cache_dir, quiet=quiet)
    torch.manual_seed(tcfg.seed)
    model = build_model(tcfg.model, num_classes=ds.num_classes).to(dev)
    stream = BatchStream.from_dataset(ds, "train", batch_size=tcfg.batch_size, seed=tcfg.stream_seed,
                                      augment=tcfg.augment, device=dev)
    strategy = _reference_strategy(strategy, lspecs, dev, quiet or not d.main)
    streams, inits = _references(lspecs, ds, tcfg, dev)
    fleet = make_fleet(model, tcfg, stream, lspecs, strategy=strategy, streams=streams, inits=inits)
    layout = _state_layout(fleet)
    nbytes = int(_pack(fleet, 0).numel())
    n_tr, n_te = _eval_sizes(ds, cfg, quiet or not d.main)
    trace_t = np.array(cfg.trace_iterations(), dtype=np.int64)
    fingerprint = ds.fingerprint
    job = {**cfg.to_dict(), "strategy": fleet.strategy.value, "device_type": dev.type,
           "members": [s.name for s in specs], "fields": list(FIELDS), "dataset": ds.describe(),
           "data_fingerprint": fingerprint, "data_source": ds.source, "data_subset": ds.meta.get("subset"),
           "eval_used": [n_tr, n_te], "trace_fields": list(TRACE_FIELDS)}
    datasets = {"metrics": ((len(cfg.t1), k, len(FIELDS)), torch.float64),
                "realized": ((k, 3), torch.float64),
                "slot0": ((k, nbytes), torch.uint8), "slot1": ((k, nbytes), torch.uint8)}
    if len(trace_t):
        datasets["trace_t"] = ((len(trace_t),), torch.int64)
        datasets["trace"] = ((len(trace_t), k, len(TRACE_FIELDS)), torch.float64)

    fresh = overwrite or not Path(out).exists()  # this call creates the file (removed again if refused at once)

    def create() -> ChaosStore:  # rank 0 lays the file out (or resumes it)
        if Path(out).exists() and not overwrite:
            check_same_data(out, job)
        return ChaosStore.open_or_create(out, job=job, overwrite=overwrite, n_units=len(cfg.t1), datasets=datasets)

    # the other ranks open it, checking it holds their job too
    store = d.create_then_open(create, lambda: ChaosStore.open_or_create(out, job=job, overwrite=False,
                                                                         n_units=len(cfg.t1), datasets=datasets))
    # The trace of this rank's members (column j: member local[j]) lives on the device for the whole
    # run; it is copied out only with each t1 unit.
    trace = torch.full((len(trace_t), len(local), len(TRACE_FIELDS)), float("nan"), dtype=torch.float64, device=dev)
    trace_row = {int(t): j for j, t in enumerate(trace_t)}
    # Every rank keeps the whole grid's arrays but fills only its members' entries; rank 0 writes them all.
    metrics = np.full((len(cfg.t1), k, len(FIELDS)), np.nan)
    realized = np.zeros((k, 3))
    full_trace = np.full((len(trace_t), k, len(TRACE_FIELDS)), np.nan)
    done = store.complete
    start, resumed_from = 0, None
    if done.any():
        u = int(np.nonzero(done)[0].max())
        if not done[:u + 1].all():
            raise ConfigError(f"{out} has non-consecutive completed units; rerun with --overwrite")
        metrics[:u + 1] = np.array(store.memmap("metrics")[:u + 1])
        realized[:] = np.array(store.memmap("realized"))
        slot = torch.from_numpy(np.array(store.memmap(f"slot{u % 2}")[local]))
        start = resumed_from = cfg.t1[u]
        if len(trace_t):
            full_trace[:] = np.array(store.memmap("trace"))
            trace.copy_(torch.from_numpy(full_trace[:, local]).to(dev))
        for j, i in enumerate(local):
            st, mom = _unpack(slot[j], layout)
            fleet.load(j, {n: v.to(dev) for n, v in st.items()}, {n: v.to(dev) for n, v in mom.items()})
            fleet.spawned[j] = specs[i].t0 is None or specs[i].t0 <= start
    template = build_model(tcfg.model, num_classes=ds.num_classes).to(dev)
    sets = _eval_sets(ds, n_tr, n_te, cfg, dev)
    t1_index = {t: u for u, t in enumerate(cfg.t1)}
    t_end = cfg.t1[-1]
    t_start = time.perf_counter()
    with store.writer() as w, d.together(gather=True):  # the end, or a rank's failure, on every rank
        desc = f"chaos {tcfg.model} K={k} ({fleet.strategy.value})" + (f", {d.world} ranks" if d.world > 1 else "")
        bar = progress_bar(range(start, t_end + 1), total=t_end + 1, initial=start, desc=desc,
                           enabled=None if not quiet and d.main else False, unit="step")
        for t in bar:
            resuming_here = resumed_from is not None and t == resumed_from
            if not resuming_here:
                for j, spec in enumerate(lspecs):
                    if spec.t0 == t:
                        info = fleet.spawn(j)
                        realized[local[j]] = [info["requested"], info["realized_l2"], info["realized_linf"]]
                        if spec.kind == "perturbed" and not cfg.allow_zero:
                            check_perturbation(spec, info, cfg, fleet, t, out,
                                               drop=fresh and d.main and not store.complete.any())
                if t in trace_row:
                    fleet.trace_into(trace, trace_row[t])
                if t in t1_index:
                    u = t1_index[t]
                    check_finite(fleet, lspecs, t,
                                  trace[:trace_row[t] + 1].cpu().numpy() if len(trace_t) else None, trace_t)
                    base = fleet.state(0)
                    for j in range(1, len(local)):
                        if fleet.spawned[j]:
                            metrics[u, local[j]] = _measure(template, base, fleet.state(j), sets, cfg)
                    parts = d.gather(_unit_part(fleet, local, d.main, u, metrics, realized, trace))
                    if d.main:
                        slots = torch.empty((k, nbytes), dtype=torch.uint8)
                        for p in parts:
                            rows = p["members"]
                            metrics[u, rows], realized[rows] = p["metrics"], p["realized"]
                            full_trace[:, rows], slots[rows] = p["trace"], p["slots"]
                        w.write("metrics", u, torch.from_numpy(metrics[u:u + 1]))
                        w.write("realized", 0, torch.from_numpy(realized))
                        if len(trace_t):
                            w.write("trace_t", 0, torch.from_numpy(trace_t))
                            w.write("trace", 0, torch.from_numpy(full_trace))
                        w.write(f"slot{u % 2}", 0, slots)
                        w.mark_complete(u)
                        ctrl = metrics[u, 1, FIELDS.index("l2")]
                        bar.set_postfix(t1=t, control_l2=f"{ctrl:.1e}", refresh=False)
            if t < t_end:
                fleet.step(t)
    if not d.main:  # rank 0 wrote the whole grid: read it back
        metrics, realized = np.array(store.memmap("metrics")), np.array(store.memmap("realized"))
        if len(trace_t):
            full_trace = np.array(store.memmap("trace"))
    return ChaosResult(store=store, config=cfg, members=specs, metrics=metrics, realized=realized,
                       resumed_from=resumed_from, wall_s=time.perf_counter() - t_start, trace_t=trace_t,
                       trace=full_trace, used=used_of(job))


def _unit_part(fleet: Fleet, local: list[int], main: bool, u: int, metrics: np.ndarray, realized: np.ndarray,
               trace: torch.Tensor) -> dict:
    """What a rank hands rank 0 at t1 unit ``u``: its members' metrics, realized sizes, trace columns and
    packed states (rank 0 also the base's)."""
    cols = range(len(local)) if main else range(1, len(local))
    rows = [local[j] for j in cols]
    return {"members": rows, "metrics": metrics[u, rows], "realized": realized[rows],
            "trace": trace[:, list(cols)].cpu().numpy(), "slots": torch.stack([_pack(fleet, j) for j in cols])}


def write_summary(result: ChaosResult, path: str | Path) -> None:
    with open(path, "w") as f:
        json.dump(result.summary(), f, indent=2)


def load_chaos(path: str | Path) -> ChaosResult:
    """Read a chaos file (complete or not) without recomputing anything."""
    import dataclasses

    store = ChaosStore(path)
    job = store.job
    names = {f.name for f in dataclasses.fields(ChaosConfig)} - {"train"}
    cfg = ChaosConfig(train=TrainConfig.from_dict(job["train"]), **{n: job[n] for n in names if n in job})
    metrics = np.array(store.verified("metrics", written_only=True))
    done = store.complete
    metrics[~done] = np.nan
    fields = tuple(job.get("fields", FIELDS_V1))
    trace_t, trace = np.zeros(0, np.int64), np.zeros((0, metrics.shape[1], 3))
    if "trace" in store.datasets and done.any():
        trace_t = np.array(cfg.trace_iterations(), dtype=np.int64)
        trace = np.array(store.verified("trace", written_only=True))
        last = cfg.t1[int(np.nonzero(done)[0].max())]
        trace[trace_t > last] = np.nan
    return ChaosResult(store=store, config=cfg, members=cfg.members(), metrics=metrics,
                       realized=np.array(store.verified("realized", written_only=True)), resumed_from=None,
                       wall_s=float("nan"), trace_t=trace_t, trace=trace, used=used_of(job), fields=fields)
