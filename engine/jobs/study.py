"""The one-command study behind ``entk reproduce``: train → eNTKs → chaos grid → analysis, for
one or more seeds, every stage resumable and stored under one directory; the figures and the
report are drawn by a ``render`` the report layer passes in (:func:`engine.report.reproduce`).

Layout of ``DIR``: ``seed<S>/run.h5`` (the base training run of seed S), ``seed<S>/kernels.h5``
(eNTK of every checkpoint), ``seed<S>/chaos.h5`` + ``chaos.json`` (the chaos grid with its
reference members and divergence traces), ``figures/`` (PNG and PDF), ``study.json`` (config,
plan, hardware, stage times, learning-rate changes, basin read-out, transition estimates with
their spread over seeds), ``report.md``, ``report.html``. A seed sets the initialisation, the
data order and the perturbation directions; the data subset is the same for every seed.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..analysis import (
    BASIN_FRAC,
    basin_transition,
    basin_values,
    chaos_transition,
    chaos_transition_of,
    growth_rates,
    growth_transition,
    load_cone,
    window_values,
)
from ..errors import ConfigError
from ..models import build_model, running_stat_layers
from ..train import TrainConfig, lr_table, train
from .chaos import ChaosConfig, load_chaos, run_chaos, write_summary
from .diagnostics import kernel_diagnostics
from .kernels import checkpoint_kernels
from .presets import ASSUMED_GPU_STEPS_PER_S, describe_plan, measure_step_seconds, plan, preset, project_seconds

# An estimate "coincides with" a learning-rate change c when it lies in [c / LR_NEAR, c * LR_NEAR]:
# about one step of the log-spaced grids either side of the change.
LR_NEAR = 2.0
# Frankle et al. call a pair stable (one basin) when its error barrier is within 2%: the independent
# pair must be above it for "another basin" to have a scale at this t1.
STABLE_ERROR_BARRIER = 0.02
BASIN_FIELDS = ("barrier_test", "error_barrier_test", "disagreement", "l2")


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def lr_changes(cfg: TrainConfig) -> list[int]:
    """Iterations t at which the learning rate of step t differs from that of step t − 1."""
    lrs = lr_table(cfg.steps, **cfg.schedule_kwargs())
    return [t for t in range(1, len(lrs)) if lrs[t] != lrs[t - 1]]


def _near_lr_change(t: float, changes: list[int]) -> bool:
    return any(c / LR_NEAR <= t <= c * LR_NEAR for c in changes)


def transition_entry(rule: str, per_seed: list, grid: list[int], changes: list[int], description: str) -> dict:
    """One ``study.json`` transition: mean over the seeds that give an estimate, its spread (sample
    standard deviation; null with fewer than two estimates), and the two guards."""
    found = [float(v) for v in per_seed if v is not None]
    it = float(np.mean(found)) if found else None
    spread = float(np.std(found, ddof=1)) if len(found) >= 2 else None
    edge = bool(grid) and any(v in (grid[0], grid[-1]) for v in found)
    near = any(_near_lr_change(v, changes) for v in found)
    return {"rule": rule, "iteration": it, "spread": spread, "per_seed": list(per_seed),
            "coincides_with_lr_change": near, "at_grid_edge": edge, "grid": [grid[0], grid[-1]] if grid else None,
            "description": description}


def _check_positive(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
        raise ConfigError(f"{name} must be a positive integer, got {v}")


def _has_batchnorm(model: str) -> bool:
    return bool(running_stat_layers(build_model(model)))


def basin_readout(summary: dict, t1s: list[int]) -> dict:
    """Per t1: the twins' (by t0), the independent pair's and the spawns' (by t0) test loss barrier,
    error barrier, disagreement and L2, and the chaos_basin t0 at that t1 (None: see basin_transition)."""
    out = {}
    for t1 in t1s:
        if not any(r["t1"] == t1 for r in summary["records"]):
            continue
        vals = {f: basin_values(summary["records"], f, t1) for f in BASIN_FIELDS}
        twins, ref, spawn = vals["barrier_test"]
        out[str(t1)] = {
            "twins": {str(t0): {f: vals[f][0][t0] for f in BASIN_FIELDS} for t0 in twins},
            "independent": {f: vals[f][1] for f in BASIN_FIELDS},
            "spawn": {str(t0): {f: vals[f][2][t0] for f in BASIN_FIELDS} for t0 in spawn},
            "chaos_basin": basin_transition(list(twins), list(twins.values()), ref)}
    return out


def _seed_stages(d: Path, cfg: TrainConfig, ccfg: ChaosConfig, *, n_probe: int, device, quiet: bool, cache_dir,
                 on_stage: Callable[[str, float, bool], None]) -> dict:
    """Train, eNTKs and chaos grid of one seed into ``d`` (each resumed where it stopped); calls
    ``on_stage(name, seconds, did_work)`` after each and returns the training result's summary."""
    d.mkdir(exist_ok=True)

    def timed(name, fn, did_work):
        t = time.perf_counter()
        res = fn()
        on_stage(name, time.perf_counter() - t, did_work(res))
        return res

    res = timed("train", lambda: train(cfg, out=d / "run.h5", device=device, quiet=quiet, cache_dir=cache_dir),
                lambda r: r.resumed_from != cfg.steps)
    timed("ntk", lambda: checkpoint_kernels(d / "run.h5", d / "kernels.h5", probe=n_probe, device=device,
                                            cache_dir=cache_dir, quiet=quiet), lambda r: bool(r.seconds))
    chaos = timed("chaos", lambda: run_chaos(ccfg, d / "chaos.h5", device=device, quiet=quiet, cache_dir=cache_dir),
                  lambda r: r.resumed_from != ccfg.t1[-1])
    write_summary(chaos, d / "chaos.json")
    return {"train_acc": res.train_acc, "test_acc": res.test_acc, "steps_per_sec": res.steps_per_sec}


def _seed_worker(d: Path, cfg: TrainConfig, ccfg: ChaosConfig, threads: int, kw: dict) -> tuple[list, dict]:
    """One seed's stages in a worker process at ``threads`` threads (no progress bars: the seeds
    share the terminal); returns ``([(stage, seconds, did_work)], train result)``."""
    torch.set_num_threads(threads)
    done: list = []
    res = _seed_stages(d, cfg, ccfg, quiet=True, on_stage=lambda *a: done.append(a), **kw)
    return done, res


def _parallel_seeds(seeds: list[int], jobs: int, threads: int, args: Callable, kw: dict, record: dict,
                    stage_done: Callable, log: Callable) -> None:
    """The seeds' stages, ``jobs`` seeds at a time in fresh processes; each seed's stage times are
    recorded when it finishes. A failed seed stops the study once the running ones end (every
    stage resumes)."""
    import concurrent.futures as cf
    import multiprocessing

    log(f"running {jobs} seeds at a time, {threads} thread(s) each (progress: one line per finished seed)")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_seed_worker, *args(s), threads, kw): s for s in seeds}
        for f in cf.as_completed(futures):
            s = futures[f]
            done, res = f.result()
            record["train_result"][str(s)] = res
            for name, dt, did in done:
                stage_done(s, name, dt, did)


def run_study(out_dir: str | Path, *, preset_name: str = "quick", model: str | None = None,
              data: str = "synthetic", data_root: str | None = None, cache_dir=None,
              steps: int | None = None, probe: int | None = None, t0: list[int] | None = None,
              t1: list[int] | None = None, checkpoints: list[int] | None = None, n_train: int | None = None,
              n_test: int | None = None, subset_seed: int = 0, eval_n: int | None = None,
              eps: float | None = None, seeds: list[int] | None = None, trace_every: int | None = None,
              window: int | None = None, schedule: str | None = None, independent: bool | None = None,
              spawn_t0: list[int] | None = None, analyse_only: bool = False, dry_run: bool = False,
              device: str | torch.device = "cpu", quiet: bool = False, log=print, jobs: int = 1,
              draw: Callable | None = None, write: Callable | None = None) -> dict:
    """Run (or resume) the whole study into ``out_dir``; returns the study record.

    The plan and its projected time are printed first; ``dry_run`` stops there (nothing is
    created). ``analyse_only``: compute nothing; analyse what the stage files hold (a chaos grid
    possibly cut short: its completed t1 are used and the report says so). ``draw(out, record,
    per, trans)`` returns the figures ({key: paths}); ``write(out, record, per)`` writes the report.
    ``jobs`` > 1 computes that many seeds at a time, each in its own process with an equal share of
    the threads (``torch.get_num_threads()``); the projected time assumes so.
    """
    for name, v in (("--probe", probe), ("--eval-n", eval_n), ("--window", window), ("--n-test", n_test),
                    ("--n-train", n_train)):
        _check_positive(name, v)
    if trace_every is not None and (int(trace_every) != trace_every or trace_every < 1):
        raise ConfigError(f"--trace-every must be a positive integer for a study (growth rates need traces), "
                          f"got {trace_every}")
    p = preset(preset_name, model=model, steps=steps)
    if data == "cifar10" and not data_root:
        raise ConfigError("--data cifar10 needs --data-root PATH")
    seeds = list(p.seeds if seeds is None else seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be distinct non-negative integers, got {seeds}")
    if int(jobs) != jobs or jobs < 1:
        raise ConfigError(f"--jobs must be a positive integer, got {jobs}")
    jobs = min(int(jobs), len(seeds))
    threads = max(1, torch.get_num_threads() // jobs)
    win = window if window is not None else p.window
    every = trace_every if trace_every is not None else p.trace_every
    ck = sorted(set(checkpoints if checkpoints is not None else p.checkpoints) | {p.steps})
    base = TrainConfig(model=p.model, data=data, data_root=data_root,
                       n_train=n_train if n_train is not None else p.n_train, n_test=n_test, subset_seed=subset_seed,
                       steps=p.steps, batch_size=p.batch_size, lr=p.lr, schedule=schedule or p.schedule,
                       milestones=p.milestones, checkpoints=ck, eval_train=min(10_000, (eval_n or p.eval_n) * 4))
    base.validate()
    bn = "recompute" if _has_batchnorm(p.model) else "interpolate"
    indep = p.independent if independent is None else bool(independent)
    spawns = list(p.spawn_t0 if spawn_t0 is None else spawn_t0)
    cfgs, chaos_cfgs = {}, {}
    for s in seeds:
        cfgs[s] = TrainConfig.from_dict({**base.to_dict(), "seed": s})
        chaos_cfgs[s] = ChaosConfig(train=TrainConfig.from_dict({**cfgs[s].to_dict(), "checkpoints": []}),
                                    t0=t0 if t0 is not None else p.t0, t1=t1 if t1 is not None else p.t1,
                                    eps=eps if eps is not None else p.eps, perturb_seed=1000 * s,
                                    eval_train=eval_n or p.eval_n, eval_test=eval_n or p.eval_n, alphas=p.alphas,
                                    trace_every=every, bn=bn, independent=indep, spawn_t0=spawns).validate()
    c0 = chaos_cfgs[seeds[0]]
    if not any(t + win <= c0.t1[-1] for t in c0.t0):
        raise ConfigError(f"no growth window [t0, t0 + {win}] ends by the last t1 ({c0.t1[-1]}); use a smaller "
                          f"--window or later --t1")
    n_probe = probe or p.probe
    changes = lr_changes(base)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; it must be a directory (created if missing)")
    work = plan(p, seeds=seeds, t0=c0.t0, t1=c0.t1, spawn_t0=c0.spawn_t0, independent=indep, checkpoints=ck,
                probe=n_probe, eval_n=c0.eval_test, alphas=c0.alphas, bn_recompute=bn == "recompute")
    dev = torch.device(device)
    if p.gpu and dev.type != "cuda":
        rate = 1 / ASSUMED_GPU_STEPS_PER_S.get(p.model, 40.0)
        note = f"at an assumed {1 / rate:.0f} steps/s of one {p.model} member on one H100 (no GPU here to measure)"
    elif analyse_only:
        rate, note = float("nan"), "nothing to compute"
    else:
        n_threads = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)  # a seed's share of the threads
            rate = measure_step_seconds(p.model, p.batch_size, dev)
        finally:
            torch.set_num_threads(n_threads)
        note = f"{rate * 1000:.0f} ms per {p.model} SGD step at batch {p.batch_size}, measured now on {dev.type}"
        if jobs > 1:
            note += f" at {threads} thread(s); {jobs} seeds at a time"
    # Seeds that run side by side take the time of one each (memory bandwidth shared: a lower bound).
    projected = project_seconds(work, rate) * math.ceil(len(seeds) / jobs) / len(seeds)
    for line in describe_plan(p, work, seconds=projected, rate_note=note):
        log(line)
    if dry_run:
        return {"preset": p.name, "plan": work, "projected_s": projected, "rate_note": note}
    (out / "figures").mkdir(parents=True, exist_ok=True)
    record_path = out / "study.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.setdefault("times_s", {})
    record.update({"preset": p.name, "preset_description": p.description, "hardware": hardware(),
                   "device": str(device), "train": base.to_dict(), "probe": n_probe, "seeds": seeds,
                   "chaos": {**c0.to_dict(), "perturb_seed": "1000 * seed"}, "window": win, "lr_changes": changes,
                   "lr_near_factor": LR_NEAR, "basin_frac": BASIN_FRAC, "synthetic": data == "synthetic"})
    if not analyse_only:
        record["plan"] = {**work, "projected_s": round(projected, 1), "rate_note": note}

    def stage(name: str, fn, did_work=lambda res: True):
        t = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t
        # A resumed stage that had nothing left to do keeps the time of the run that did the work.
        if did_work(res) or name not in record["times_s"]:
            record["times_s"][name] = round(dt, 1)
        record_path.write_text(json.dumps(record, indent=2))
        log(f"[{name}] done in {dt:.1f} s")
        return res

    log(f"entk reproduce ({p.name}): {p.model} on {data}, {p.steps} steps ({base.schedule} lr), {len(ck)} "
        f"checkpoints, seeds {seeds} -> {out}")
    record.setdefault("train_result", {})

    def stage_done(s: int, name: str, dt: float, did_work: bool) -> None:
        # A resumed stage that had nothing left to do keeps the time of the run that did the work.
        if did_work or f"seed{s}/{name}" not in record["times_s"]:
            record["times_s"][f"seed{s}/{name}"] = round(dt, 1)
        record_path.write_text(json.dumps(record, indent=2))
        log(f"[seed{s}/{name}] done in {dt:.1f} s")

    if analyse_only:
        for s in seeds:
            d = out / f"seed{s}"
            if not (d / "kernels.h5").exists() or not (d / "chaos.h5").exists():
                raise ConfigError(f"--analyse-only: {d} lacks kernels.h5 or chaos.h5; run the study first")
            write_summary(load_chaos(d / "chaos.h5"), d / "chaos.json")
    elif jobs == 1:
        for s in seeds:
            record["train_result"][str(s)] = _seed_stages(
                out / f"seed{s}", cfgs[s], chaos_cfgs[s], n_probe=n_probe, device=device, quiet=quiet,
                cache_dir=cache_dir, on_stage=lambda name, dt, did, s=s: stage_done(s, name, dt, did))
    else:
        _parallel_seeds(seeds, jobs, threads, lambda s: (out / f"seed{s}", cfgs[s], chaos_cfgs[s]),
                        dict(n_probe=n_probe, device=str(device), cache_dir=cache_dir), record, stage_done, log)

    def analysis():
        per = {}
        for s in seeds:
            d = out / f"seed{s}"
            cone = load_cone(d / "kernels.h5")
            summary = load_chaos(d / "chaos.h5").summary()
            chaos_t, _ = chaos_transition_of(summary["records"])
            rates = growth_rates(summary["trace"], win)
            wdis = window_values(summary["trace"], win, "dissimilarity")
            t0s = sorted(rates)
            per[s] = {"cone": cone, "summary": summary, "chaos_t": chaos_t, "rates": rates, "window_dis": wdis,
                      "growth_t": growth_transition(t0s, [rates[t] for t in t0s]),
                      "window_t": chaos_transition(t0s, [wdis[t] for t in t0s]),
                      "basins": basin_readout(summary, c0.t1),
                      "diag": kernel_diagnostics(d / "kernels.h5", cone, cfgs[s], cache_dir=cache_dir)}
        first = per[seeds[0]]
        t0_grid = sorted(c0.t0)
        done_t1 = min(max((r["t1"] for r in per[s]["summary"]["records"]), default=0) for s in seeds)
        record["chaos_completed_t1"] = done_t1
        win_grid = [t for t in t0_grid if t + win <= done_t1]
        ck_grid = [int(i) for i in first["cone"].iterations]
        basin = transition_entry(
            "chaos_basin", [per[s]["basins"].get(str(done_t1), {}).get("chaos_basin") for s in seeds], t0_grid,
            changes, f"the paper's question, which basin the twins end in: the first t0 from which the twin's test "
                     f"loss barrier at the last t1 = {done_t1} stays at or below {BASIN_FRAC:g} x the barrier "
                     f"between the base and an independent run (another initialisation, same data order); none "
                     f"when the last t0's twin is still above it or the independent pair is not in two basins")
        refs = [per[s]["basins"].get(str(done_t1), {}).get("independent", {}) for s in seeds]
        basin["reference_barrier"] = [r.get("barrier_test") for r in refs]
        basin["reference_error_barrier"] = [r.get("error_barrier_test") for r in refs]
        basin["reference_separated"] = bool(refs) and all(
            r.get("error_barrier_test") is not None and r["error_barrier_test"] >= STABLE_ERROR_BARRIER for r in refs)
        trans = [
            basin,
            transition_entry("cone", [int(per[s]["cone"].transition_iteration) for s in seeds], ck_grid, changes,
                             first["cone"].rule),
            transition_entry("sensitivity_dissimilarity", [per[s]["chaos_t"] for s in seeds], t0_grid, changes,
                             f"in-basin sensitivity, not the transition: the first t0 whose twin dissimilarity "
                             f"1 - cos at the last t1 = {done_t1} is at or below the geometric midpoint between the "
                             f"largest value and the last t0's value"),
            transition_entry("sensitivity_window", [per[s]["window_t"] for s in seeds], win_grid, changes,
                             f"in-basin sensitivity: the same midpoint rule on the dissimilarity at the fixed window "
                             f"t1 = t0 + {win}"),
            transition_entry("sensitivity_growth", [per[s]["growth_t"] for s in seeds], win_grid, changes,
                             f"in-basin sensitivity: the first t0, from the fastest-growing one on, whose "
                             f"finite-time growth rate of the L2 distance over [t0, t0 + {win}] is <= 0 "
                             f"(perturbations stop growing; growth inside one basin is expected)"),
        ]
        figs = draw(out, record, per, trans) if draw else {}
        return per, trans, figs

    per, trans, figs = stage("analysis", analysis)
    record["transitions"] = trans
    record["basins"] = {str(s): per[s]["basins"] for s in seeds}
    record["growth"] = {str(s): {"rates": {str(k): v for k, v in per[s]["rates"].items()},
                                 "window_dissimilarity": {str(k): v for k, v in per[s]["window_dis"].items()}}
                        for s in seeds}
    record["kernels"] = {str(s): per[s]["diag"].to_dict() for s in seeds}
    record["estimates"] = {
        "noise_floor": max(per[s]["summary"]["noise_floor"] for s in seeds),
        "cone_half_angle_deg": float(np.mean([math.degrees(per[s]["cone"].cone_half_angle) for s in seeds])),
        "cone_rule": per[seeds[0]]["cone"].rule,
        **{f"{t['rule']}_iteration": t["iteration"] for t in trans}}
    record["figures"] = {k: [str(Path(f).relative_to(out)) for f in v] for k, v in figs.items()}
    record_path.write_text(json.dumps(record, indent=2))
    if write:
        paths = write(out, record, {s: (per[s]["cone"], per[s]["summary"]) for s in seeds})
        record["report"] = [str(Path(x).relative_to(out)) for x in paths]
        record_path.write_text(json.dumps(record, indent=2))
        log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return record
