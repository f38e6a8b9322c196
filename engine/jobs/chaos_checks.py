"""The chaos job's checks, each one line for people: same data on resume, a perturbation that
survives rounding, finite members (named with the iteration they diverged at)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, EngineError
from ..store import ChaosStore
from ..twins import Fleet, MemberSpec, ZeroPerturbationError

# A perturbation must change at least this fraction of the non-zero (trained) parameters in their
# dtype; one that lands only on exactly-zero parameters (biases at init) is gone after a step.
MIN_CHANGED_FRACTION = 1e-3


class ChaosDivergedError(EngineError, RuntimeError):
    """A member of the chaos fleet (or the base) has non-finite parameters."""


def check_same_data(out, job: dict) -> None:
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


def check_perturbation(spec: MemberSpec, info: dict, cfg, fleet: Fleet, t: int, out, *, drop: bool = False) -> None:
    """Refuse a perturbation that does not change the trained (non-zero) parameters in their dtype.

    ``drop``: the file was created by this call and holds no result yet, so it is removed (a refused
    job leaves nothing behind); otherwise the results before ``t`` stay in it."""
    frac = info["changed_nonzero"] / max(info["nonzero"], 1)
    if info["realized_l2"] > 0 and frac >= MIN_CHANGED_FRACTION:
        return
    dtype = next(iter(fleet.state(0).values())).dtype
    if drop:
        Path(out).unlink(missing_ok=True)
    raise ZeroPerturbationError(
        f"the perturbation of member {spec.name} (eps={cfg.eps}, norm={cfg.norm}) rounds to zero in {dtype} on "
        f"the trained parameters: it changes {info['changed_nonzero']} of {info['nonzero']} non-zero values "
        f"(needs {MIN_CHANGED_FRACTION:.1%}; {info['changed']} of {info['coords']} coordinates in all); use a "
        f"larger eps or another norm, or allow it explicitly (--allow-zero). "
        + (f"Nothing was written ({out} removed)" if drop else f"Results for t1 < {t} are kept in {out}"))


def check_finite(fleet: Fleet, specs: list[MemberSpec], t: int, trace: np.ndarray | None, trace_t) -> None:
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
