"""`entk train`: one run, checkpointed into an HDF5 run file (resumable)."""

from __future__ import annotations

import argparse

from ..errors import EngineError
from ..models import MODEL_NAMES
from ..train import SCHEDULES, TrainConfig, parse_iterations, train
from .options import (
    NEED_ROOT,
    add_data_args,
    add_device,
    add_json,
    add_overwrite,
    add_quiet,
    check_outputs,
    floats,
    seed,
    work_done,
    write_json,
)


def add_run_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Model, seeds, device, optimizer and schedule flags shared by `train` and `chaos`."""
    g = p.add_argument_group("model and run")
    g.add_argument("--model", default=d.model, choices=MODEL_NAMES, help=f"architecture (default: {d.model})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    g.add_argument("--seed", type=seed, default=d.seed, help="seed of the initialization (default: 0)")
    g.add_argument("--data-seed", type=seed, default=None,
                   help="seed of batch order and augmentation (default: --seed)")
    add_device(g)
    det = g.add_mutually_exclusive_group()
    det.add_argument("--deterministic", dest="deterministic", action="store_true", default=d.deterministic,
                     help="deterministic algorithms and cuBLAS workspace (default: on)")
    det.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                     help="allow nondeterministic (possibly faster) kernels")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    g.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default: {d.momentum})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"L2 weight decay on all parameters (default: {d.weight_decay})")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help=f"learning-rate schedule (default: {d.schedule})")
    g.add_argument("--milestones", type=floats, default=list(d.milestones), metavar="LIST",
                   help="multistep milestones: fractions of --steps if all <= 1, else steps "
                        "(default: 0.5,0.75)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="multistep factor (default: 0.1)")
    g.add_argument("--warmup", type=int, default=0, metavar="STEPS",
                   help="linear warm-up steps before the schedule (default: 0)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="disable random crop (4-pixel padding) and horizontal flip")
    g.add_argument("--eval-train", type=int, default=d.eval_train, metavar="N",
                   help="training images used for the final train accuracy (0 = all; default: 10000)")


def check_run_args(args) -> None:
    """The checks that must come before anything derived from the flags (the checkpoint list)."""
    if args.data == "cifar10" and not args.data_root:
        raise EngineError(NEED_ROOT)
    if args.steps < 0:
        raise EngineError(f"--steps must be >= 0, got {args.steps}")


def train_config(args, checkpoints: list[int]) -> TrainConfig:
    """The validated TrainConfig of `train`/`chaos` arguments."""
    check_run_args(args)
    return TrainConfig(
        model=args.model, data=args.data, data_root=args.data_root, n_train=args.n_train,
        n_test=args.n_test, subset_seed=args.subset_seed, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
        milestones=tuple(args.milestones), gamma=args.gamma, warmup_steps=args.warmup,
        seed=args.seed, data_seed=args.data_seed, augment=args.augment, checkpoints=checkpoints,
        deterministic=args.deterministic, eval_train=args.eval_train,
    ).validate()


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train one run, checkpointing into an HDF5 run file",
                       description="Train one network with SGD on a deterministic batch stream, "
                                   "saving checkpoints into an HDF5 run file. Running the same "
                                   "command again resumes from the last completed checkpoint.")
    add_run_args(p, TrainConfig())
    p.add_argument("--checkpoints", default="0", metavar="LIST",
                   help="iterations to save, comma-separated; items may be log:N (N log-spaced) or "
                        "every:K; 0 is the initialization and the final step is always saved "
                        "(example: 0,1,2,5,10,20,50,log:20)")
    p.add_argument("--out", metavar="RUN.h5", help="HDF5 run file (default: train without saving)")
    add_overwrite(p, "replace an existing --out instead of resuming it")
    add_data_args(p)
    add_quiet(p)
    add_json(p, "also write a JSON summary: the config, accuracies, losses, timing and --out")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    check_run_args(args)  # --steps before the checkpoint list, which is checked against it
    if args.out and not args.checkpoints.strip(" ,"):
        raise EngineError("--checkpoints is empty; expected iterations such as 0,10,log:20 (the default is 0)")
    cfg = train_config(args, parse_iterations(args.checkpoints, args.steps) if args.out else [])
    check_outputs(files=[("--out", args.out), ("--json", args.json)])
    res = train(cfg, out=args.out, device=args.device, overwrite=args.overwrite,
                quiet=args.quiet, cache_dir=args.cache_dir)
    work_done()  # the run is saved: a Ctrl-C during the report no longer means "interrupted"
    print(f"{cfg.model} on {cfg.data}: {res.describe()}")
    print(f"final train accuracy {res.train_acc:.4f}  test accuracy {res.test_acc:.4f}")
    if args.out:
        print(f"checkpoints {cfg.checkpoints[:8]}{' ...' if len(cfg.checkpoints) > 8 else ''} "
              f"saved in {args.out}")
    if args.json:
        write_json(args.json, "train", {"config": cfg.to_dict(),
                                        **{k: v for k, v in vars(res).items() if k != "out"},
                                        "out": str(res.out) if res.out else None})
    return 0
