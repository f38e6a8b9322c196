"""`entk reproduce`: the whole study (train, eNTKs, chaos grid, cone analysis, report) in one command."""

from __future__ import annotations

import argparse

from ..determinism import resolve_device
from ..errors import EngineError
from ..jobs.presets import PRESETS
from .options import SEED_LIMIT, add_data_args, add_device, add_json, add_quiet, check_outputs, int_list, write_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("reproduce", help="the whole study: train, eNTKs, chaos grid, cone analysis, report",
                       description="Reproduce the Chaos and Cone effects (arXiv 2505.13900) in one command: "
                                   "train a base run with a checkpoint schedule dense early and log-spaced "
                                   "later, compute the eNTK of every checkpoint, run the chaos grid, analyse "
                                   "the kernel trajectory, and write figures (PNG, PDF), report.md and a "
                                   "self-contained report.html into --out. Rerunning resumes every stage.")
    p.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="quick: synthetic data, one seed, small grids, minutes on 2 CPU cores; cpu-basins: which "
                        "basin the twins end in on real CIFAR-10 (cnn, 3 seeds, 2000 steps, lr /10 at 1000 and 1500; "
                        "hours on 2 CPU cores), cpu-basins-constant: the same at a constant lr; gpu-fig3: the "
                        "paper's Figure 3 (resnet20 or --model vgg16, full CIFAR-10, 160 epochs); cpu-small, "
                        "gpu-paper: the earlier in-basin sensitivity presets. Every preset prints its plan and "
                        "projected time first (default: quick)")
    p.add_argument("--model", help="architecture (default: the preset's: cnn on the CPU, resnet20 on the GPU)")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory (created; resumed if present)")
    p.add_argument("--steps", type=int, help="shorten (or lengthen) the run: SGD steps")
    p.add_argument("--probe", type=int, help="eNTK probe images (default: 50 cpu-small, 100 gpu-paper)")
    p.add_argument("--checkpoints", metavar="LIST", help="checkpoint iterations (default: the preset's schedule)")
    p.add_argument("--t0", metavar="LIST", help="chaos spawn iterations (default: the preset's)")
    p.add_argument("--t1", metavar="LIST", help="chaos comparison iterations (default: the preset's)")
    p.add_argument("--eps", type=float, help="perturbation size (default: 1e-7)")
    p.add_argument("--eval-n", type=int, metavar="N", help="images in the chaos metric subsets (default: preset's)")
    p.add_argument("--seeds", metavar="LIST", help="repeat the study for these seeds (init, data order, perturbation)")
    p.add_argument("--trace-every", type=int, metavar="K", help="divergence trace spacing in steps (default: preset's)")
    p.add_argument("--window", type=int, metavar="D", help="growth-rate window after each t0 (default: preset's)")
    p.add_argument("--schedule", choices=["constant", "multistep"], help="learning-rate schedule (default: preset's)")
    p.add_argument("--independent", action=argparse.BooleanOptionalAction, default=None,
                   help="the reference run from another initialisation on the same data order (default: the "
                        "preset's; on for quick, cpu-basins and gpu-fig3)")
    p.add_argument("--spawn-t0", metavar="LIST",
                   help="reference copies of the base at these t0 on another data order ('none': no spawns; "
                        "default: the preset's)")
    p.add_argument("--jobs", type=int, default=1, metavar="K",
                   help="compute K seeds at a time, each in its own process with 1/K of the threads (default 1; "
                        "on 2 cores, --jobs 2 runs the 3-seed cpu-basins preset in about two seeds' time)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its projected time, run nothing")
    p.add_argument("--analyse-only", action="store_true", help="compute nothing; analyse and report what DIR holds")
    add_device(p)
    add_data_args(p)
    # Embedded default: real CIFAR-10 when --data-root is given, else synthetic data (the report says which).
    p.set_defaults(data=None)
    add_quiet(p, "no progress bars")
    add_json(p, "also write a JSON summary: the study record (configs, stage times, estimates, report files)")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    lists = {k: None if getattr(args, k) is None else
             int_list(getattr(args, k), f"--{k}", limit=SEED_LIMIT if k == "seeds" else None)
             for k in ("checkpoints", "t0", "t1", "seeds")}
    spawn = None
    if args.spawn_t0 is not None:
        spawn = [] if args.spawn_t0.strip().lower() == "none" else int_list(args.spawn_t0, "--spawn-t0")
    data = args.data or ("cifar10" if args.data_root else "synthetic")
    for flag, v in (("--steps", args.steps), ("--probe", args.probe), ("--eval-n", args.eval_n),
                    ("--window", args.window)):
        if v is not None and v < 1:  # before --out is created
            raise EngineError(f"{flag} must be a positive integer, got {v}")
    if args.jobs < 1:
        raise EngineError(f"--jobs must be a positive integer, got {args.jobs}")
    if args.trace_every is not None and args.trace_every < 0:
        raise EngineError(f"--trace-every must be >= 0 (0: off), got {args.trace_every}")
    if args.dry_run:
        from ..jobs.study import run_study  # no figures: no matplotlib

        record = run_study(args.out, preset_name=args.preset, model=args.model, data=data, data_root=args.data_root,
                           steps=args.steps, probe=args.probe, n_train=args.n_train, eval_n=args.eval_n,
                           seeds=lists["seeds"], t0=lists["t0"], t1=lists["t1"], checkpoints=lists["checkpoints"],
                           independent=args.independent, spawn_t0=spawn, window=args.window,
                           device=resolve_device(args.device), jobs=args.jobs, dry_run=True)
        if args.json:
            write_json(args.json, "reproduce", {"out": str(args.out), **record})
        return 0
    check_outputs(dirs=[("--out", args.out)], files=[("--json", args.json)])
    from ..report import reproduce  # matplotlib: only the command that draws pays its import

    record = reproduce(args.out, preset_name=args.preset, model=args.model, data=data, data_root=args.data_root,
                       cache_dir=args.cache_dir, steps=args.steps, probe=args.probe, n_train=args.n_train,
                       n_test=args.n_test, subset_seed=args.subset_seed, eval_n=args.eval_n, eps=args.eps,
                       trace_every=args.trace_every, window=args.window, schedule=args.schedule,
                       independent=args.independent, spawn_t0=spawn,
                       analyse_only=args.analyse_only, device=resolve_device(args.device), quiet=args.quiet,
                       jobs=args.jobs, **lists)
    if args.json:
        write_json(args.json, "reproduce", {"out": str(args.out), **record})
    return 0
