"""The Chaos Effect experiment (arXiv 2505.13900, Fig. 3) as one resumable job.

One base run; at each t₀ a member is spawned from the base with a perturbation of
size ε; one control member is spawned with ε = 0 at the earliest t₀. All train on
the same batches. At each t₁ every spawned member is compared with the base:
parameter dissimilarity, loss barrier on fixed train and test subsets, prediction
disagreement. The control's numbers are the run's noise floor (exactly 0 in
deterministic mode on the CPU).

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
from ..errors import ConfigError, EngineError
from ..metrics import disagreement, loss_barrier, param_dissimilarity
from ..models import build_model
from ..progress import progress as progress_bar
from ..store import ChaosStore
from ..train import TrainConfig, prepare_data
from ..twins import (
    NORMS,
    Fleet,
    MemberSpec,
    Perturbation,
    Strategy,
    ZeroPerturbationError,
    make_fleet,
    resolve_strategy,
)
from .distributed import Dist, rank_device

FIELDS = ("dissimilarity", "l2", "rel_l2", "barrier_train", "barrier_test", "disagreement",
          "acc_base", "acc_member")
TRACE_FIELDS = ("l2", "dissimilarity", "norm")
# A perturbation must change at least this fraction of the non-zero (trained) parameters in their
# dtype; one that lands only on exactly-zero parameters (biases at init) is gone after a step.
MIN_CHANGED_FRACTION = 1e-3


class ChaosDivergedError(EngineError, RuntimeError):
    """A member of the chaos fleet (or the base) has non-finite parameters."""


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


@dataclass
class ChaosResult:
    store: ChaosStore
    config: ChaosConfig
    members: list[MemberSpec]
    metrics: np.ndarray          # (|t1|, K, F)
    realized: np.ndarray         # (K, 3)
    resumed_from: int | None
    wall_s: float
    trace_t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # (n,)
    trace: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3)))       # (n, K, 3) NaN before spawn
    used: dict = field(default_factory=dict)   # eval subset sizes actually used, data fingerprint

    def traces(self) -> list[dict]:
        """One record per spawned member: ``t``, ``l2``, ``dissimilarity`` from its t0 on (recorded points)."""
        out = []
        for k, spec in enumerate(self.members):
            if spec.t0 is None or not len(self.trace_t):
                continue
            ok = (self.trace_t >= spec.t0) & np.isfinite(self.trace[:, k, 0])
            out.append({"member": spec.kind, "name": spec.name, "t0": spec.t0,
                        "t": self.trace_t[ok].tolist(), "l2": self.trace[ok, k, 0].tolist(),
                        "dissimilarity": self.trace[ok, k, 1].tolist()})
        return out

    def records(self) -> list[dict]:
        """One record per (t0, t1, member) with t1 >= t0, for the JSON summary."""
        out = []
        for u, t1 in enumerate(self.config.t1):
            for k, spec in enumerate(self.members):
                if spec.t0 is None or t1 < spec.t0 or not np.isfinite(self.metrics[u, k]).any():
                    continue  # the base itself, not spawned yet, or not computed yet (incomplete job)
                rec = {"t0": spec.t0, "t1": t1, "member": spec.kind}
                rec.update({f: float(v) for f, v in zip(FIELDS, self.metrics[u, k], strict=True)})
                if spec.kind == "control":
                    # The control is spawned once, at the first t0; report it for every t0 <= t1.
                    for t0 in self.config.t0:
                        if t0 <= t1:
                            out.append({**rec, "t0": t0})
                else:
                    out.append(rec)
        return out

    def summary(self) -> dict:
        return {"config": self.config.to_dict(),
                "members": [{"name": s.name, "kind": s.kind, "t0": s.t0,
                             "requested": float(self.realized[k, 0]), "realized_l2": float(self.realized[k, 1]),
                             "realized_linf": float(self.realized[k, 2])} for k, s in enumerate(self.members)],
                "noise_floor": self.noise_floor(), "used": self.used, "records": self.records(),
                "trace": self.traces()}

    def noise_floor(self) -> float:
        """Largest control-vs-base L2 distance over all t₁ (0.0 when deterministic)."""
        k = next(i for i, s in enumerate(self.members) if s.kind == "control")
        col = self.metrics[:, k, FIELDS.index("l2")]
        col = col[np.isfinite(col)]
        return float(col.max()) if len(col) else float("nan")


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
            dg["acc_a"], dg["acc_b"]]


def run_chaos(cfg: ChaosConfig, out: str | Path, *, dataset: Dataset | None = None,
              device: str | torch.device = "cpu", overwrite: bool = False, quiet: bool = False,
              cache_dir=None) -> ChaosResult:
    """Run (or resume) the chaos grid into ``out``.

    Under torchrun the members are shared over the ranks, each rank training its own copy of the
    base (module docstring); every rank returns the whole result.
    """
    cfg.validate()
    d = Dist()
    try:
        return _run_chaos(d, cfg, out, dataset=dataset, device=device, overwrite=overwrite, quiet=quiet,
                          cache_dir=cache_dir)
    finally:
        d.close()


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
    fleet = make_fleet(model, tcfg, stream, lspecs, strategy=strategy)
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

    def create() -> ChaosStore:  # rank 0 lays the file out (or resumes it)
        if Path(out).exists() and not overwrite:
            _check_same_data(out, job)
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
                            _check_perturbation(spec, info, cfg, fleet, t, out)
                if t in trace_row:
                    fleet.trace_into(trace, trace_row[t])
                if t in t1_index:
                    u = t1_index[t]
                    _check_finite(fleet, lspecs, t,
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
                       trace=full_trace, used=_used(job))


def _unit_part(fleet: Fleet, local: list[int], main: bool, u: int, metrics: np.ndarray, realized: np.ndarray,
               trace: torch.Tensor) -> dict:
    """What a rank hands rank 0 at t1 unit ``u``: its members' metrics, realized sizes, trace columns and
    packed states (rank 0 also the base's)."""
    cols = range(len(local)) if main else range(1, len(local))
    rows = [local[j] for j in cols]
    return {"members": rows, "metrics": metrics[u, rows], "realized": realized[rows],
            "trace": trace[:, list(cols)].cpu().numpy(), "slots": torch.stack([_pack(fleet, j) for j in cols])}


def _used(job: dict) -> dict:
    return {"eval_train": job.get("eval_used", [None, None])[0], "eval_test": job.get("eval_used", [None, None])[1],
            "data_fingerprint": job.get("data_fingerprint"), "data_source": job.get("data_source"),
            "data_subset": job.get("data_subset")}


def _check_same_data(out, job: dict) -> None:
    """A resumed job must see the same data: one line naming both fingerprints (and sources)."""
    try:
        old = ChaosStore(out).job
    except Exception:  # not a chaos file, or damaged: open_or_create gives its own one-line error
        return
    if old.get("data_fingerprint") != job["data_fingerprint"]:
        raise ConfigError(
            f"{out} was computed on other data: it holds {old.get('data_fingerprint')} "
            f"({old.get('data_source')}, subset {old.get('data_subset')}), this run has {job['data_fingerprint']} "
            f"({job['data_source']}, subset {job['data_subset']}); pass the same data or --overwrite")


def _check_perturbation(spec: MemberSpec, info: dict, cfg: ChaosConfig, fleet: Fleet, t: int, out) -> None:
    """Refuse a perturbation that does not change the trained (non-zero) parameters in their dtype."""
    frac = info["changed_nonzero"] / max(info["nonzero"], 1)
    if info["realized_l2"] > 0 and frac >= MIN_CHANGED_FRACTION:
        return
    dtype = next(iter(fleet.state(0).values())).dtype
    raise ZeroPerturbationError(
        f"the perturbation of member {spec.name} (eps={cfg.eps}, norm={cfg.norm}) rounds to zero in {dtype} on "
        f"the trained parameters: it changes {info['changed_nonzero']} of {info['nonzero']} non-zero values "
        f"(needs {MIN_CHANGED_FRACTION:.1%}; {info['changed']} of {info['coords']} coordinates in all); use a "
        f"larger eps or another norm, or allow it explicitly (--allow-zero). Results for t1 < {t} are kept in {out}")


def _check_finite(fleet: Fleet, specs: list[MemberSpec], t: int, trace: np.ndarray | None, trace_t) -> None:
    """Name the member that diverged and when (to within the trace spacing) before measuring anything."""
    for i, spec in enumerate(specs):
        if not fleet.spawned[i]:
            continue
        st = fleet.state(i)
        if all(bool(torch.isfinite(v).all()) for v in st.values() if v.is_floating_point()):
            continue
        who = "the base run" if spec.t0 is None else f"member {spec.name}"
        when = f"before iteration {t}"
        if trace is not None:
            bad = np.flatnonzero(~np.isfinite(trace[:, i, 2]) & (trace_t[:len(trace)] >= (spec.t0 or 0)))
            if len(bad):
                j = int(bad[0])
                when = (f"between iterations {int(trace_t[j - 1])} and {int(trace_t[j])}" if j > 0
                        else f"by iteration {int(trace_t[j])}")
        loss = float(fleet.last_loss[i])
        raise ChaosDivergedError(f"{who} diverged {when}: its parameters are not finite (last batch loss {loss:.3g}); "
                                 f"lower the learning rate")


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
    trace_t, trace = np.zeros(0, np.int64), np.zeros((0, metrics.shape[1], 3))
    if "trace" in store.datasets and done.any():
        trace_t = np.array(cfg.trace_iterations(), dtype=np.int64)
        trace = np.array(store.verified("trace", written_only=True))
        last = cfg.t1[int(np.nonzero(done)[0].max())]
        trace[trace_t > last] = np.nan
    return ChaosResult(store=store, config=cfg, members=cfg.members(), metrics=metrics,
                       realized=np.array(store.verified("realized", written_only=True)), resumed_from=None,
                       wall_s=float("nan"),
                       trace_t=trace_t, trace=trace, used=_used(job))
