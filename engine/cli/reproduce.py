"""`entk reproduce`: the whole study (train, eNTKs, chaos grid, cone analysis, report) in one command."""

from __future__ import annotations

import argparse

from ..determinism import resolve_device
from ..errors import EngineError
from .options import SEED_LIMIT, add_data_args, add_device, add_json, add_quiet, check_outputs, int_list, write_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("reproduce", help="the whole study: train, eNTKs, chaos grid, cone analysis, report",
                       description="Reproduce the Chaos and Cone effects (arXiv 2505.13900) in one command: "
                                   "train a base run with a checkpoint schedule dense early and log-spaced "
                                   "later, compute the eNTK of every checkpoint, run the chaos grid, analyse "
                                   "the kernel trajectory, and write figures (PNG, PDF), report.md and a "
                                   "self-contained report.html into --out. Rerunning resumes every stage.")
    p.add_argument("--preset", default="cpu-small", choices=["cpu-small", "gpu-paper"],
                   help="cpu-small: about 15 minutes per seed on 2 CPU cores, seeds 0,1,2 (cnn, 10,000 "
                        "images, constant learning rate); gpu-paper: the paper's setting (full CIFAR-10, 160 epochs) "
                        "(default: cpu-small)")
    p.add_argument("--model", help="architecture (default: cnn for cpu-small, resnet20 for gpu-paper)")
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
    data = args.data or ("cifar10" if args.data_root else "synthetic")
    for flag, v in (("--steps", args.steps), ("--probe", args.probe), ("--eval-n", args.eval_n),
                    ("--window", args.window)):
        if v is not None and v < 1:  # before --out is created
            raise EngineError(f"{flag} must be a positive integer, got {v}")
    if args.trace_every is not None and args.trace_every < 0:
        raise EngineError(f"--trace-every must be >= 0 (0: off), got {args.trace_every}")
    check_outputs(dirs=[("--out", args.out)], files=[("--json", args.json)])
    from ..report import reproduce  # matplotlib: only the command that draws pays its import

    record = reproduce(args.out, preset_name=args.preset, model=args.model, data=data, data_root=args.data_root,
                       cache_dir=args.cache_dir, steps=args.steps, probe=args.probe, n_train=args.n_train,
                       n_test=args.n_test, subset_seed=args.subset_seed, eval_n=args.eval_n, eps=args.eps,
                       trace_every=args.trace_every, window=args.window, schedule=args.schedule,
                       analyse_only=args.analyse_only, device=resolve_device(args.device), quiet=args.quiet,
                       **lists)
    if args.json:
        write_json(args.json, "reproduce", {"out": str(args.out), **record})
    return 0
