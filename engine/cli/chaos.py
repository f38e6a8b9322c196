"""`entk chaos`: the Chaos Effect grid (twins perturbed at t0, compared with the base at t1)."""

from __future__ import annotations

import argparse
import sys

from ..determinism import resolve_device
from ..errors import ConfigError
from ..jobs import ChaosConfig, run_chaos
from ..jobs.distributed import Dist
from ..train import TrainConfig
from .options import add_data_args, add_json, add_overwrite, add_quiet, check_outputs, int_list, seed, write_json
from .train import add_run_args, train_config


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chaos", help="the Chaos Effect grid: twins perturbed at t0, compared at t1",
                       description="Train one base run; at each t0 spawn a twin perturbed by eps (and one "
                                   "control twin with eps=0); train all on identical batches; at each t1 "
                                   "compare every twin with the base (parameter dissimilarity, loss barrier on "
                                   "train and test subsets, prediction disagreement). Resumes after an "
                                   "interruption (arXiv 2505.13900, Fig. 3). Under torchrun --nproc-per-node K the "
                                   "twins are shared over the K ranks (member i, the control first, to rank "
                                   "(i-1) % K), each rank training its own copy of the base on the same batches; "
                                   "bit-identical to one process with --strategy loop.")
    add_run_args(p, TrainConfig())
    p.set_defaults(steps=None)  # default: the last t1 (the lr schedule spans --steps)
    g = p.add_argument_group("chaos grid")
    g.add_argument("--t0", required=True, metavar="LIST", help="spawn iterations, comma-separated")
    g.add_argument("--t1", required=True, metavar="LIST", help="comparison iterations, comma-separated")
    g.add_argument("--eps", type=float, default=1e-7, help="perturbation size (default: 1e-7, the paper's)")
    g.add_argument("--norm", default="l2", choices=["l2", "linf", "gaussian", "relative"],
                   help="l2: |delta|_2 = eps over all parameters; linf: each coordinate +-eps; gaussian: each "
                        "coordinate N(0, eps^2); relative: |delta|_2 = eps |theta|_2 (default: l2)")
    g.add_argument("--perturb-seed", type=seed, default=0, help="seed of the perturbation directions (default: 0)")
    g.add_argument("--weights-only", action="store_true",
                   help="perturb only conv/linear weights (not biases or normalization parameters)")
    g.add_argument("--allow-zero", action="store_true",
                   help="continue even if a perturbation rounds to zero in the parameter dtype")
    g.add_argument("--eval-n", type=int, default=1000, metavar="N",
                   help="size of the fixed seeded train and test subsets for the metrics (default: 1000)")
    g.add_argument("--alphas", type=int, default=11,
                   help="points on the linear path for the loss barrier (default: 11)")
    g.add_argument("--bn", default="interpolate", choices=["interpolate", "recompute"],
                   help="BatchNorm statistics along the path: interpolate the buffers, or recompute them on the "
                        "train subset at each alpha (default: interpolate)")
    g.add_argument("--strategy", default="auto", choices=["auto", "loop", "vmap"],
                   help="fleet execution: loop (one model per twin) or vmap (stacked); "
                        "auto: vmap on CUDA, loop on CPU and under torchrun")
    g.add_argument("--independent", action="store_true",
                   help="add a reference run from another initialisation on the same data order (the scale of "
                        "'another basin' for the loss barrier)")
    g.add_argument("--spawn-t0", metavar="LIST",
                   help="add reference copies of the base at these iterations trained on another data order "
                        "(Frankle et al.'s stability test; loop strategy)")
    g.add_argument("--trace-every", type=int, default=10, metavar="K",
                   help="record every twin's L2 distance and 1-cos to the base every K steps (0: off; default 10)")
    g.add_argument("--out", required=True, metavar="CHAOS.h5", help="results (HDF5; see docs/FORMAT.md)")
    add_overwrite(g)
    add_data_args(p)
    add_quiet(p)
    add_json(p, "also write a JSON summary: the config, the noise floor and one record per (t0, t1, member)")
    p.add_argument("--summary", metavar="CHAOS.json", help="deprecated alias of --json")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    json_flag = "--json"
    if args.summary:
        if args.json and args.json != args.summary:
            raise ConfigError("--summary is a deprecated alias of --json; give one of them")
        print("entk chaos: warning: --summary is deprecated; use --json", file=sys.stderr)
        args.json, json_flag = args.summary, "--summary"
    t0, t1 = int_list(args.t0, "--t0"), int_list(args.t1, "--t1")
    if args.steps is None:
        args.steps = max(t1, default=0)  # the run only needs to reach the last comparison
    cfg = ChaosConfig(train=train_config(args, []), t0=t0, t1=t1, eps=args.eps, norm=args.norm,
                      perturb_seed=args.perturb_seed, weights_only=args.weights_only, allow_zero=args.allow_zero,
                      eval_train=args.eval_n, eval_test=args.eval_n, alphas=args.alphas, bn=args.bn,
                      strategy=args.strategy, trace_every=args.trace_every, independent=args.independent,
                      spawn_t0=int_list(args.spawn_t0, "--spawn-t0") if args.spawn_t0 else []).validate()
    rank0 = Dist.launched_rank() == 0  # under torchrun, rank 0 checks, prints and writes --json
    if rank0:
        check_outputs(files=[("--out", args.out), (json_flag, args.json)])
    res = run_chaos(cfg, args.out, device=resolve_device(args.device), overwrite=args.overwrite,
                    quiet=args.quiet, cache_dir=args.cache_dir)
    if not rank0:
        return 0
    resumed = f", resumed from t={res.resumed_from}" if res.resumed_from is not None else ""
    print(f"chaos grid {cfg.train.model}: {len(res.members)} members, t0={cfg.t0}, t1={cfg.t1}{resumed}")
    print(f"noise floor (control vs base, L2): {res.noise_floor():.3g}")
    for s, r in zip(res.members, res.realized, strict=True):
        if s.kind == "perturbed":
            print(f"  {s.name}: eps {r[0]:.3g} ({cfg.norm}) realized L2 {r[1]:.3g}")
    heads = ("t0", "t1", "member", "dissim", "l2", "barrier_tr", "barrier_te", "disagree")
    print(" ".join(f"{h:>10}" for h in heads))
    for rec in res.records():
        print(f"{rec['t0']:>10} {rec['t1']:>10} {rec['member']:>10} {rec['dissimilarity']:>10.3g} "
              f"{rec['l2']:>10.3g} {rec['barrier_train']:>10.3g} {rec['barrier_test']:>10.3g} "
              f"{rec['disagreement']:>10.4f}")
    if args.json:
        write_json(args.json, "chaos", {"out": str(args.out), "resumed_from": res.resumed_from, **res.summary()})
    return 0
