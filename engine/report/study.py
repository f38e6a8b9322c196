"""The one-command study behind ``entk reproduce``: train → eNTKs → chaos grid → cone
analysis → figures → report, for one or more seeds, every stage resumable and stored under
one directory.

Layout of ``DIR``: ``seed<S>/run.h5`` (the base training run of seed S), ``seed<S>/kernels.h5``
(eNTK of every checkpoint), ``seed<S>/chaos.h5`` + ``chaos.json`` (the chaos grid with its
divergence traces), ``figures/`` (PNG and PDF), ``study.json`` (config, hardware, stage times,
learning-rate changes, transition estimates with their spread over seeds), ``report.md``,
``report.html``. A seed sets the initialisation, the data order and the perturbation directions;
the data subset is the same for every seed.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..analysis import (
    chaos_transition,
    chaos_transition_of,
    growth_rates,
    growth_transition,
    load_cone,
    window_values,
)
from ..errors import ConfigError
from ..jobs import ChaosConfig, checkpoint_kernels, load_chaos, run_chaos, write_summary
from ..train import TrainConfig, lr_table, train
from .diagnostics import kernel_diagnostics
from .document import write_report
from .figures import plot_chaos, plot_cone, plot_growth, plot_kernel_diagnostics, plot_kernel_distance

# An estimate "coincides with" a learning-rate change c when it lies in [c / LR_NEAR, c * LR_NEAR]:
# about one step of the log-spaced grids either side of the change.
LR_NEAR = 2.0


def log_schedule(steps: int, n: int = 40) -> list[int]:
    """0, every iteration up to 10, then ``n`` log-spaced iterations up to ``steps``."""
    pts = {0, *range(1, min(10, steps) + 1), steps}
    if steps > 10:
        pts |= {round(float(v)) for v in np.geomspace(10, steps, n)}
    return sorted(pts)


@dataclass
class Preset:
    name: str
    model: str
    steps: int
    n_train: int | None
    checkpoints: list[int]
    probe: int
    t0: list[int]
    t1: list[int]
    eval_n: int
    eps: float = 1e-7
    batch_size: int = 128
    lr: float = 0.1
    schedule: str = "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)
    window: int = 100          # Δ of the growth rates and of the fixed-window metrics
    trace_every: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    alphas: int = 11
    description: str = ""


def _scaled(ts, s: int, base: int, *, keep_zero: bool = True) -> list[int]:
    return sorted({round(t * s / base) for t in ts if keep_zero or t})


# cpu-small: constant learning rate through the whole run (no decay anywhere), 8 log-spaced t0 and
# 6 log-spaced t1 (the chaos grid is the costly stage: K twins x its horizon); the last window
# [t0, t0 + Δ] ends at the last t1; the kernel trajectory runs on to 1000.
_CPU_STEPS = 1000
_CPU_T0 = [0, 4, 8, 15, 30, 60, 110, 200]
_CPU_T1 = [20, 40, 75, 140, 220, 300]
_CPU_WINDOW = 100
# gpu-paper: the paper's recipe (decay x0.1 at 50% and 75% of 160 epochs); the chaos grid spans the
# first phase and ends long before the first decay (iteration 31,200).
_GPU_STEPS = 62_400
_GPU_T0 = [0, 10, 30, 100, 300, 1000, 3000, 10_000]
_GPU_T1 = [300, 1000, 3000, 10_000, 20_000, 30_000]
_GPU_WINDOW = 2000


def preset(name: str, *, model: str | None = None, steps: int | None = None) -> Preset:
    """``cpu-small``: a small CNN on 10,000 images at a constant learning rate, three seeds, about
    15 minutes per seed on 2 CPU cores (most of it the chaos grid). ``gpu-paper``: the paper's
    setting (full CIFAR-10, 160 epochs of batch 128 = 62,400 steps, lr 0.1 divided by 10 at 50%
    and 75%). ``steps`` rescales the grids of either."""
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ConfigError(f"--steps must be a positive integer, got {steps}")
    if name == "cpu-small":
        s = _CPU_STEPS if steps is None else int(steps)
        return Preset(name, model or "cnn", s, 10_000, log_schedule(s, 24), 50,
                      _scaled(_CPU_T0, s, _CPU_STEPS), _scaled(_CPU_T1, s, _CPU_STEPS), 400, alphas=7,
                      window=max(1, round(_CPU_WINDOW * s / _CPU_STEPS)), trace_every=max(1, round(5 * s / _CPU_STEPS)),
                      seeds=[0, 1, 2], description=f"small CNN on 10,000 training images, {s} SGD steps at a constant "
                                                f"learning rate; about 15 minutes per seed on 2 CPU cores")
    if name == "gpu-paper":
        s = _GPU_STEPS if steps is None else int(steps)
        return Preset(name, model or "resnet20", s, None, log_schedule(s, 40), 100,
                      _scaled(_GPU_T0, s, _GPU_STEPS), _scaled(_GPU_T1, s, _GPU_STEPS), 2000,
                      schedule="multistep", window=max(1, round(_GPU_WINDOW * s / _GPU_STEPS)),
                      trace_every=max(1, round(50 * s / _GPU_STEPS)), seeds=[0, 1, 2],
                      description="the paper's setting: full CIFAR-10, 160 epochs (62,400 steps) unless shortened, "
                                  "lr divided by 10 at 50% and 75%")
    raise ConfigError(f"preset must be cpu-small or gpu-paper, got {name!r}")


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


def reproduce(out_dir: str | Path, *, preset_name: str = "cpu-small", model: str | None = None,
              data: str = "synthetic", data_root: str | None = None, cache_dir=None,
              steps: int | None = None, probe: int | None = None, t0: list[int] | None = None,
              t1: list[int] | None = None, checkpoints: list[int] | None = None, n_train: int | None = None,
              n_test: int | None = None, subset_seed: int = 0, eval_n: int | None = None,
              eps: float | None = None, seeds: list[int] | None = None, trace_every: int | None = None,
              window: int | None = None, schedule: str | None = None, analyse_only: bool = False,
              device: str | torch.device = "cpu", quiet: bool = False, log=print) -> dict:
    """Run (or resume) the whole study into ``out_dir``; returns the study record.

    ``analyse_only``: compute nothing; analyse what the stage files hold (train and eNTK stages
    complete, a chaos grid possibly cut short: its completed t1 are used and the report says so).
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
    win = window if window is not None else p.window
    every = trace_every if trace_every is not None else p.trace_every
    ck = sorted(set(checkpoints if checkpoints is not None else p.checkpoints) | {p.steps})
    base = TrainConfig(model=p.model, data=data, data_root=data_root,
                       n_train=n_train if n_train is not None else p.n_train, n_test=n_test, subset_seed=subset_seed,
                       steps=p.steps, batch_size=p.batch_size, lr=p.lr, schedule=schedule or p.schedule,
                       milestones=p.milestones, checkpoints=ck, eval_train=min(10_000, (eval_n or p.eval_n) * 4))
    base.validate()
    cfgs, chaos_cfgs = {}, {}
    for s in seeds:
        cfgs[s] = TrainConfig.from_dict({**base.to_dict(), "seed": s})
        chaos_cfgs[s] = ChaosConfig(train=TrainConfig.from_dict({**cfgs[s].to_dict(), "checkpoints": []}),
                                    t0=t0 if t0 is not None else p.t0, t1=t1 if t1 is not None else p.t1,
                                    eps=eps if eps is not None else p.eps, perturb_seed=1000 * s,
                                    eval_train=eval_n or p.eval_n, eval_test=eval_n or p.eval_n, alphas=p.alphas,
                                    trace_every=every).validate()
    c0 = chaos_cfgs[seeds[0]]
    if not any(t + win <= c0.t1[-1] for t in c0.t0):
        raise ConfigError(f"no growth window [t0, t0 + {win}] ends by the last t1 ({c0.t1[-1]}); use a smaller "
                          f"--window or later --t1")
    n_probe = probe or p.probe
    changes = lr_changes(base)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; it must be a directory (created if missing)")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    record_path = out / "study.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.setdefault("times_s", {})
    record.update({"preset": p.name, "preset_description": p.description, "hardware": hardware(),
                   "device": str(device), "train": base.to_dict(), "probe": n_probe, "seeds": seeds,
                   "chaos": {**c0.to_dict(), "perturb_seed": "1000 * seed"}, "window": win, "lr_changes": changes,
                   "lr_near_factor": LR_NEAR, "synthetic": data == "synthetic"})

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
    for s in seeds:
        d = out / f"seed{s}"
        if analyse_only:
            if not (d / "kernels.h5").exists() or not (d / "chaos.h5").exists():
                raise ConfigError(f"--analyse-only: {d} lacks kernels.h5 or chaos.h5; run the study first")
            write_summary(load_chaos(d / "chaos.h5"), d / "chaos.json")
            continue
        d.mkdir(exist_ok=True)
        cfg, ccfg = cfgs[s], chaos_cfgs[s]
        res = stage(f"seed{s}/train", lambda d=d, cfg=cfg: train(cfg, out=d / "run.h5", device=device, quiet=quiet,
                                                                  cache_dir=cache_dir),
                    lambda r, cfg=cfg: r.resumed_from != cfg.steps)
        record["train_result"][str(s)] = {"train_acc": res.train_acc, "test_acc": res.test_acc,
                                          "steps_per_sec": res.steps_per_sec}
        stage(f"seed{s}/ntk", lambda d=d: checkpoint_kernels(d / "run.h5", d / "kernels.h5", probe=n_probe,
                                                             device=device, cache_dir=cache_dir, quiet=quiet),
              lambda r: bool(r.seconds))
        chaos = stage(f"seed{s}/chaos", lambda d=d, ccfg=ccfg: run_chaos(ccfg, d / "chaos.h5", device=device,
                                                                          quiet=quiet, cache_dir=cache_dir),
                      lambda r, ccfg=ccfg: r.resumed_from != ccfg.t1[-1])
        write_summary(chaos, d / "chaos.json")

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
                      "diag": kernel_diagnostics(d / "kernels.h5", cone, cfgs[s], cache_dir=cache_dir)}
        first = per[seeds[0]]
        t0_grid = sorted(c0.t0)
        done_t1 = min(max((r["t1"] for r in per[s]["summary"]["records"]), default=0) for s in seeds)
        record["chaos_completed_t1"] = done_t1
        win_grid = [t for t in t0_grid if t + win <= done_t1]
        ck_grid = [int(i) for i in first["cone"].iterations]
        trans = [
            transition_entry("cone", [int(per[s]["cone"].transition_iteration) for s in seeds], ck_grid, changes,
                             first["cone"].rule),
            transition_entry("chaos_dissimilarity", [per[s]["chaos_t"] for s in seeds], t0_grid, changes,
                             f"the first t0 whose twin dissimilarity 1 - cos at the last t1 = {done_t1} is at or "
                             f"below the geometric midpoint between the largest value and the last t0's value"),
            transition_entry("chaos_window", [per[s]["window_t"] for s in seeds], win_grid, changes,
                             f"the same midpoint rule on the dissimilarity at the fixed window t1 = t0 + {win}"),
            transition_entry("chaos_growth", [per[s]["growth_t"] for s in seeds], win_grid, changes,
                             f"the first t0, from the fastest-growing one on, whose finite-time growth rate of the "
                             f"L2 distance over [t0, t0 + {win}] is <= 0 (perturbations stop growing)"),
        ]
        chaos_mark = next(t["iteration"] for t in trans if t["rule"] == "chaos_growth")
        if chaos_mark is None:
            chaos_mark = next(t["iteration"] for t in trans if t["rule"] == "chaos_dissimilarity")
        summaries = [per[s]["summary"] for s in seeds]
        figs = {"fig3": plot_chaos(summaries, out / "figures" / "fig3_chaos", lr_changes=changes),
                "fig4": plot_kernel_distance(first["cone"], out / "figures" / "fig4_kernel_distance",
                                             lr_changes=changes, title=f"seed {seeds[0]}"),
                "fig5": plot_cone(first["cone"], out / "figures" / "fig5_cone",
                                  chaos_t0=None if chaos_mark is None else round(chaos_mark), lr_changes=changes,
                                  title=f"seed {seeds[0]}"),
                "fig6": plot_growth(summaries, out / "figures" / "fig6_growth", window=win, lr_changes=changes,
                                    transitions=trans),
                "fig7": plot_kernel_diagnostics([per[s]["diag"] for s in seeds], out / "figures" / "fig7_kernels",
                                                lr_changes=changes, cone_transition=trans[0]["iteration"])}
        return per, trans, figs

    per, trans, figs = stage("analysis", analysis)
    record["transitions"] = trans
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
    paths = write_report(out, record, per={s: (per[s]["cone"], per[s]["summary"]) for s in seeds})
    record["report"] = [str(Path(x).relative_to(out)) for x in paths]
    record_path.write_text(json.dumps(record, indent=2))
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return record
