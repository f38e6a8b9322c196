"""The one-command study behind ``entk reproduce``: train → eNTKs → chaos grid → cone
analysis → figures → report, every stage resumable and stored under one directory.

Layout of ``DIR``: ``run.h5`` (the base training run), ``kernels.h5`` (eNTK of every
checkpoint), ``chaos.h5`` + ``chaos.json`` (the chaos grid), ``figures/`` (PNG and PDF),
``study.json`` (config, hardware, stage times, estimates), ``report.md``, ``report.html``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..analysis import chaos_transition_of, load_cone
from ..errors import ConfigError
from ..jobs import ChaosConfig, load_chaos, run_chaos, write_summary
from ..ntk import checkpoint_kernels
from ..train import TrainConfig, train
from .document import write_report
from .figures import plot_chaos, plot_cone, plot_kernel_distance

# Dense early, log-spaced later: the transition happens in the first few hundred iterations.
_CPU_CHECKPOINTS = [0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 400, 500, 600]


def log_schedule(steps: int, n: int = 40) -> list[int]:
    """0, every iteration up to 10, then ``n`` log-spaced iterations up to ``steps``."""
    import numpy as np

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
    description: str = ""
    extra: dict = field(default_factory=dict)


def preset(name: str, *, model: str | None = None, steps: int | None = None) -> Preset:
    """``cpu-small``: under 15 minutes on 2 CPU cores (cnn, 10,000 images, 600 steps).
    ``gpu-paper``: the paper's setting (full CIFAR-10, 160 epochs of batch 128 = 62,400 steps,
    lr 0.1 divided by 10 at 50% and 75%), shortened by ``steps``."""
    if name == "cpu-small":
        s = steps or 600
        ck = [c for c in _CPU_CHECKPOINTS if c <= s] + ([s] if s not in _CPU_CHECKPOINTS else [])
        t0 = [t for t in (0, 10, 30, 100, 300) if t < s]
        t1 = sorted({t for t in (100, 300, s) if t <= s})
        return Preset(name, model or "cnn", s, 10_000, ck, 50, t0, t1, 500,
                      description="small CNN on 10,000 training images, 600 SGD steps; minutes on a CPU")
    if name == "gpu-paper":
        s = steps or 62_400
        t0 = sorted({t for t in (0, 100, 300, 1000, 3000, 10_000, 30_000) if t < s} | {0})
        t1 = sorted({t for t in (1000, 10_000, s) if t <= s} | {s})
        return Preset(name, model or "resnet20", s, None, log_schedule(s, 40), 100, t0, t1, 2000,
                      description="the paper's setting: full CIFAR-10, 160 epochs (62,400 steps) unless shortened")
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


def reproduce(out_dir: str | Path, *, preset_name: str = "cpu-small", model: str | None = None,
              data: str = "synthetic", data_root: str | None = None, cache_dir=None,
              steps: int | None = None, probe: int | None = None, t0: list[int] | None = None,
              t1: list[int] | None = None, checkpoints: list[int] | None = None, n_train: int | None = None,
              eval_n: int | None = None, eps: float | None = None, device: str | torch.device = "cpu",
              quiet: bool = False, log=print) -> dict:
    """Run (or resume) the whole study into ``out_dir``; returns the study record."""
    p = preset(preset_name, model=model, steps=steps)
    if data == "cifar10" and not data_root:
        raise ConfigError("--data cifar10 needs --data-root PATH")
    ck = sorted(set(checkpoints if checkpoints is not None else p.checkpoints) | {p.steps})
    cfg = TrainConfig(model=p.model, data=data, data_root=data_root,
                      n_train=n_train if n_train is not None else p.n_train, steps=p.steps,
                      batch_size=p.batch_size, checkpoints=ck, eval_train=min(10_000, p.eval_n * 4))
    cfg.validate()
    chaos_cfg = ChaosConfig(train=TrainConfig.from_dict({**cfg.to_dict(), "checkpoints": []}),
                            t0=t0 if t0 is not None else p.t0, t1=t1 if t1 is not None else p.t1,
                            eps=eps if eps is not None else p.eps,
                            eval_train=eval_n or p.eval_n, eval_test=eval_n or p.eval_n).validate()
    n_probe = probe or p.probe
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    record_path = out / "study.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.setdefault("times_s", {})
    record.update({"preset": p.name, "preset_description": p.description, "hardware": hardware(),
                   "device": str(device), "train": cfg.to_dict(), "probe": n_probe,
                   "chaos": chaos_cfg.to_dict(), "synthetic": data == "synthetic"})

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

    log(f"entk reproduce ({p.name}): {p.model} on {data}, {p.steps} steps, {len(ck)} checkpoints -> {out}")
    res = stage("train", lambda: train(cfg, out=out / "run.h5", device=device, quiet=quiet, cache_dir=cache_dir),
                lambda r: r.resumed_from != cfg.steps)
    record["train_result"] = {"train_acc": res.train_acc, "test_acc": res.test_acc, "steps_per_sec": res.steps_per_sec}
    stage("ntk", lambda: checkpoint_kernels(out / "run.h5", out / "kernels.h5", probe=n_probe, device=device,
                                            cache_dir=cache_dir, quiet=quiet), lambda r: bool(r.seconds))
    chaos = stage("chaos", lambda: run_chaos(chaos_cfg, out / "chaos.h5", device=device, quiet=quiet,
                                             cache_dir=cache_dir), lambda r: r.resumed_from != chaos_cfg.t1[-1])
    write_summary(chaos, out / "chaos.json")

    def analysis():
        cone = load_cone(out / "kernels.h5")
        summary = load_chaos(out / "chaos.h5").summary()
        chaos_t, _ = chaos_transition_of(summary["records"])
        figs = {"fig3": plot_chaos(summary, out / "figures" / "fig3_chaos"),
                "fig4": plot_kernel_distance(cone, out / "figures" / "fig4_kernel_distance"),
                "fig5": plot_cone(cone, out / "figures" / "fig5_cone", chaos_t0=chaos_t)}
        return cone, summary, chaos_t, figs

    cone, summary, chaos_t, figs = stage("analysis", analysis)
    record["estimates"] = {"cone_transition_iteration": int(cone.transition_iteration),
                           "cone_half_angle_deg": float(cone.cone_half_angle * 180 / 3.141592653589793),
                           "cone_rule": cone.rule, "chaos_transition_t0": chaos_t,
                           "noise_floor": summary["noise_floor"]}
    record["figures"] = {k: [str(Path(f).relative_to(out)) for f in v] for k, v in figs.items()}
    record_path.write_text(json.dumps(record, indent=2))
    paths = write_report(out, record, cone=cone, chaos_summary=summary)
    record["report"] = [str(Path(x).relative_to(out)) for x in paths]
    record_path.write_text(json.dumps(record, indent=2))
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return record
