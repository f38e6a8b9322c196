"""What a chaos job returns and what its summary JSON holds: per (t0, t1, member) records, the
members (with their reference seeds), the divergence traces and the noise floor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store import ChaosStore
from ..twins import MemberSpec

FIELDS = ("dissimilarity", "l2", "rel_l2", "barrier_train", "barrier_test", "disagreement",
          "acc_base", "acc_member", "error_barrier_test")
# Files written before the error barrier was recorded hold these fields (their job says so too).
FIELDS_V1 = FIELDS[:8]
TRACE_FIELDS = ("l2", "dissimilarity", "norm")
# The reference members, compared with the base like the twins but read as the scale of "another basin".
REFERENCE_KINDS = ("independent", "spawn")


@dataclass
class ChaosResult:
    store: ChaosStore
    config: Any                  # ChaosConfig
    members: list[MemberSpec]
    metrics: np.ndarray          # (|t1|, K, F)
    realized: np.ndarray         # (K, 3)
    resumed_from: int | None
    wall_s: float
    trace_t: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # (n,)
    trace: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3)))       # (n, K, 3) NaN before spawn
    used: dict = field(default_factory=dict)   # eval subset sizes actually used, data fingerprint
    fields: tuple = FIELDS

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
        """One record per (t0, t1, member) with t1 >= t0, for the JSON summary.

        The control is spawned once, at the first t0, and reported for every t0 <= t1; the
        independent reference is reported at its own t0 (the first t0: a whole run from another
        initialisation), a spawn reference at its t0.
        """
        out = []
        for u, t1 in enumerate(self.config.t1):
            for k, spec in enumerate(self.members):
                if spec.t0 is None or t1 < spec.t0 or not np.isfinite(self.metrics[u, k]).any():
                    continue  # the base itself, not spawned yet, or not computed yet (incomplete job)
                rec = {"t0": spec.t0, "t1": t1, "member": spec.kind}
                rec.update({f: float(v) for f, v in zip(self.fields, self.metrics[u, k], strict=True)})
                if spec.kind == "control":
                    for t0 in self.config.t0:
                        if t0 <= t1:
                            out.append({**rec, "t0": t0})
                else:
                    out.append(rec)
        return out

    def summary(self) -> dict:
        return {"config": self.config.to_dict(),
                "members": [{"name": s.name, "kind": s.kind, "t0": s.t0, "init_seed": s.init_seed,
                             "data_seed": s.data_seed,
                             "requested": float(self.realized[k, 0]), "realized_l2": float(self.realized[k, 1]),
                             "realized_linf": float(self.realized[k, 2])} for k, s in enumerate(self.members)],
                "noise_floor": self.noise_floor(), "used": self.used, "records": self.records(),
                "trace": self.traces()}

    def noise_floor(self) -> float:
        """Largest control-vs-base L2 distance over all t₁ (0.0 when deterministic)."""
        k = next(i for i, s in enumerate(self.members) if s.kind == "control")
        col = self.metrics[:, k, self.fields.index("l2")]
        col = col[np.isfinite(col)]
        return float(col.max()) if len(col) else float("nan")


def used_of(job: dict) -> dict:
    """The eval subset sizes and data identity a chaos job recorded."""
    return {"eval_train": job.get("eval_used", [None, None])[0], "eval_test": job.get("eval_used", [None, None])[1],
            "data_fingerprint": job.get("data_fingerprint"), "data_source": job.get("data_source"),
            "data_subset": job.get("data_subset")}
