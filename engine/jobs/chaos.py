"""The Chaos Effect experiment (arXiv 2505.13900, Fig. 3) as one resumable job.

One base run; at each t₀ a member is spawned from the base with a perturbation of
size ε; one control member is spawned with ε = 0 at the earliest t₀. All train on
the same batches. At each t₁ every spawned member is compared with the base:
parameter dissimilarity, loss barrier on fixed train and test subsets, prediction
disagreement. The control's numbers are the run's noise floor (exactly 0 in
deterministic mode on the CPU).

Output: an ``entk-chaos`` HDF5 file (docs/FORMAT.md); unit u is the metrics at
``t1[u]``; the whole fleet state at the last completed t₁ is kept in one of two
alternating slots, so a killed job resumes bit-identically.
"""

from __future__ import annotations

import json
import math
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
from ..twins import NORMS, Fleet, MemberSpec, Perturbation, ZeroPerturbationError, make_fleet

FIELDS = ("dissimilarity", "l2", "rel_l2", "barrier_train", "barrier_test", "disagreement",
          "acc_base", "acc_member")


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
        return self

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
                "noise_floor": self.noise_floor(), "records": self.records()}

    def noise_floor(self) -> float:
        """Largest control-vs-base L2 distance over all t₁ (0.0 when deterministic)."""
        k = next(i for i, s in enumerate(self.members) if s.kind == "control")
        col = self.metrics[:, k, FIELDS.index("l2")]
        col = col[np.isfinite(col)]
        return float(col.max()) if len(col) else float("nan")


def _eval_sets(ds: Dataset, cfg: ChaosConfig, device) -> dict:
    n_tr, n_te = min(cfg.eval_train, len(ds.y_train)), min(cfg.eval_test, len(ds.y_test))
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
    """Run (or resume) the chaos grid into ``out``."""
    cfg.validate()
    dev = torch.device(device)
    tcfg = cfg.train
    specs = cfg.members()
    k = len(specs)
    set_deterministic(tcfg.deterministic)
    ds = dataset if dataset is not None else prepare_data(tcfg, cache_dir=cache_dir, quiet=quiet)
    torch.manual_seed(tcfg.seed)
    model = build_model(tcfg.model, num_classes=ds.num_classes).to(dev)
    stream = BatchStream.from_dataset(ds, "train", batch_size=tcfg.batch_size, seed=tcfg.stream_seed,
                                      augment=tcfg.augment, device=dev)
    fleet = make_fleet(model, tcfg, stream, specs, strategy=cfg.strategy)
    layout = _state_layout(fleet)
    nbytes = int(_pack(fleet, 0).numel())
    job = {**cfg.to_dict(), "strategy": fleet.strategy.value, "device_type": dev.type,
           "members": [s.name for s in specs], "fields": list(FIELDS), "dataset": ds.describe()}
    store = ChaosStore.open_or_create(out, job=job, overwrite=overwrite, n_units=len(cfg.t1), datasets={
        "metrics": ((len(cfg.t1), k, len(FIELDS)), torch.float64),
        "realized": ((k, 3), torch.float64),
        "slot0": ((k, nbytes), torch.uint8), "slot1": ((k, nbytes), torch.uint8)})
    metrics = np.full((len(cfg.t1), k, len(FIELDS)), np.nan)
    realized = np.zeros((k, 3))
    done = store.complete
    start, resumed_from = 0, None
    if done.any():
        u = int(np.nonzero(done)[0].max())
        if not done[:u + 1].all():
            raise ConfigError(f"{out} has non-consecutive completed units; rerun with --overwrite")
        metrics[:u + 1] = np.array(store.memmap("metrics")[:u + 1])
        realized[:] = np.array(store.memmap("realized"))
        slot = torch.from_numpy(np.array(store.memmap(f"slot{u % 2}")))
        start = resumed_from = cfg.t1[u]
        for i, spec in enumerate(specs):
            st, mom = _unpack(slot[i], layout)
            fleet.load(i, {n: v.to(dev) for n, v in st.items()}, {n: v.to(dev) for n, v in mom.items()})
            fleet.spawned[i] = spec.t0 is None or spec.t0 <= start
    template = build_model(tcfg.model, num_classes=ds.num_classes).to(dev)
    sets = _eval_sets(ds, cfg, dev)
    t1_index = {t: u for u, t in enumerate(cfg.t1)}
    t_end = cfg.t1[-1]
    t_start = time.perf_counter()
    with store.writer() as w:
        bar = progress_bar(range(start, t_end + 1), total=t_end + 1, initial=start,
                           desc=f"chaos {tcfg.model} K={k} ({fleet.strategy.value})",
                           enabled=None if not quiet else False, unit="step")
        for t in bar:
            resuming_here = resumed_from is not None and t == resumed_from
            if not resuming_here:
                for i, spec in enumerate(specs):
                    if spec.t0 == t:
                        info = fleet.spawn(i)
                        realized[i] = [info["requested"], info["realized_l2"], info["realized_linf"]]
                        if spec.kind == "perturbed" and info["realized_l2"] == 0 and not cfg.allow_zero:
                            raise ZeroPerturbationError(
                                f"the perturbation of member {spec.name} (eps={cfg.eps}, norm={cfg.norm}) rounds to "
                                f"zero in {next(iter(fleet.state(0).values())).dtype}; use a larger eps or another "
                                f"norm, or allow it explicitly (--allow-zero). Results for t1 < {t} are kept in "
                                f"{out}")
                if t in t1_index:
                    u = t1_index[t]
                    base = fleet.state(0)
                    for i in range(1, k):
                        if fleet.spawned[i]:
                            metrics[u, i] = _measure(template, base, fleet.state(i), sets, cfg)
                    w.write("metrics", u, torch.from_numpy(metrics[u:u + 1]))
                    w.write("realized", 0, torch.from_numpy(realized))
                    w.write(f"slot{u % 2}", 0, torch.stack([_pack(fleet, i) for i in range(k)]))
                    w.mark_complete(u)
                    ctrl = metrics[u, 1, FIELDS.index("l2")]
                    bar.set_postfix(t1=t, control_l2=f"{ctrl:.1e}", refresh=False)
            if t < t_end:
                fleet.step(t)
    return ChaosResult(store=store, config=cfg, members=specs, metrics=metrics, realized=realized,
                       resumed_from=resumed_from, wall_s=time.perf_counter() - t_start)


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
    metrics = np.array(store.memmap("metrics"))
    metrics[~store.complete] = np.nan
    return ChaosResult(store=store, config=cfg, members=cfg.members(), metrics=metrics,
                       realized=np.array(store.memmap("realized")), resumed_from=None, wall_s=float("nan"))
