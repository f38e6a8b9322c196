"""The ``entk`` command line (also ``python -m engine``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from .errors import EngineError

_NEED_ROOT = "--data cifar10 needs --data-root PATH (a JPEG tree, its .tar.gz, or cifar-10-batches-py)"


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=["synthetic", "cifar10"],
                   help="dataset: 'synthetic' (seeded, class-structured, needs no files; default) "
                        "or 'cifar10' (needs --data-root)")
    g.add_argument("--data-root", metavar="PATH",
                   help="CIFAR-10 location: a JPEG tree (train/<class>/*.jpg, test/<class>/*.jpg), "
                        "its .tar.gz, or torchvision's cifar-10-batches-py folder")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where decoded CIFAR-10 is cached (default: $ENTK_CACHE_DIR or ~/.cache/entk)")
    g.add_argument("--n-train", type=int, metavar="N",
                   help="use a seeded class-balanced subset of N training images (default: all)")
    g.add_argument("--n-test", type=int, metavar="N",
                   help="use a seeded class-balanced subset of N test images (default: all)")
    g.add_argument("--subset-seed", type=int, default=0, metavar="S",
                   help="seed of the subset selection (default: 0)")


def _add_run_args(p: argparse.ArgumentParser, d) -> None:
    """Model, seeds, device, optimizer and schedule flags shared by `train` and `chaos`."""
    from .models import MODEL_NAMES
    from .train import SCHEDULES

    g = p.add_argument_group("model and run")
    g.add_argument("--model", default=d.model, choices=MODEL_NAMES, help=f"architecture (default: {d.model})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the initialization (default: 0)")
    g.add_argument("--data-seed", type=int, default=None,
                   help="seed of batch order and augmentation (default: --seed)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
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
    g.add_argument("--milestones", type=_floats, default=list(d.milestones), metavar="LIST",
                   help="multistep milestones: fractions of --steps if all <= 1, else steps "
                        "(default: 0.5,0.75)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="multistep factor (default: 0.1)")
    g.add_argument("--warmup", type=int, default=0, metavar="STEPS",
                   help="linear warm-up steps before the schedule (default: 0)")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="disable random crop (4-pixel padding) and horizontal flip")
    g.add_argument("--eval-train", type=int, default=d.eval_train, metavar="N",
                   help="training images used for the final train accuracy (0 = all; default: 10000)")


def _train_config(args, checkpoints: list[int]):
    from .train import TrainConfig

    if args.data == "cifar10" and not args.data_root:
        raise EngineError(_NEED_ROOT)
    if args.steps < 0:
        raise EngineError(f"--steps must be >= 0, got {args.steps}")
    return TrainConfig(
        model=args.model, data=args.data, data_root=args.data_root, n_train=args.n_train,
        n_test=args.n_test, subset_seed=args.subset_seed, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, nesterov=args.nesterov, schedule=args.schedule,
        milestones=tuple(args.milestones), gamma=args.gamma, warmup_steps=args.warmup,
        seed=args.seed, data_seed=args.data_seed, augment=args.augment, checkpoints=checkpoints,
        deterministic=args.deterministic, eval_train=args.eval_train,
    ).validate()


def _build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="entk",
        description="Empirical NTK engine: train CIFAR networks, compute eNTKs, study "
                    "two-phase learning dynamics (arXiv 2505.13900).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one run, checkpointing into an HDF5 run file",
                       description="Train one network with SGD on a deterministic batch stream, "
                                   "saving checkpoints into an HDF5 run file. Running the same "
                                   "command again resumes from the last completed checkpoint.")
    _add_run_args(p, d)
    p.add_argument("--checkpoints", default="0", metavar="LIST",
                   help="iterations to save, comma-separated; items may be log:N (N log-spaced) or "
                        "every:K; 0 is the initialization and the final step is always saved "
                        "(example: 0,1,2,5,10,20,50,log:20)")
    p.add_argument("--out", metavar="RUN.h5", help="HDF5 run file (default: train without saving)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of resuming it")
    _add_data_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="FILE", help="also write the final summary as JSON")

    p = sub.add_parser("ntk", help="eNTKs of a run's checkpoints on a fixed probe set, and their distances",
                       description="Compute the empirical NTK H = J J^T of checkpoints of a training run "
                                   "on a fixed, seeded, class-balanced probe set (BatchNorm in eval mode), "
                                   "store them in one HDF5 file and print the pairwise kernel distances "
                                   "S = 1 - <H1,H2>_F / (|H1| |H2|). Rerunning resumes at the first missing "
                                   "checkpoint.")
    p.add_argument("--run", required=True, metavar="RUN.h5", help="the run file written by entk train")
    p.add_argument("--checkpoints", default="all", metavar="LIST",
                   help="iterations to use, comma-separated (default: every completed checkpoint)")
    p.add_argument("--probe", type=int, default=100, metavar="N",
                   help="number of probe images (class-balanced, seeded; default: 100)")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the probe selection (default: 0)")
    p.add_argument("--probe-split", default="test", choices=["test", "train"],
                   help="which split the probe images come from (default: test)")
    p.add_argument("--out", required=True, metavar="KERNELS.h5", help="output HDF5 file (see docs/FORMAT.md)")
    p.add_argument("--kernel", default="full", choices=["full", "traced"],
                   help="full: (N*C)x(N*C) with row n*C+c; traced: NxN summed over the C outputs")
    p.add_argument("--backend", default="auto", choices=["auto", "structured", "reference"],
                   help="Jacobian backend: structured (fast per-layer rules) or reference (torch.func)")
    p.add_argument("--ops-backend", default="auto", choices=["auto", "torch", "triton", "ext"],
                   help="fused Gram tiles and kernel inner products: torch (reference), triton, ext (csrc/), auto")
    p.add_argument("--float64", action="store_true", help="accumulate the Gram in float64 (default: float32)")
    p.add_argument("--budget-gb", type=float, default=2.0,
                   help="memory for Jacobian blocks; larger Jacobians are done by parameter groups (default: 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--data-root", metavar="PATH", help="CIFAR-10 location if it moved since training")
    p.add_argument("--cache-dir", metavar="DIR", help="decoded-CIFAR-10 cache directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a different job")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("chaos", help="the Chaos Effect grid: twins perturbed at t0, compared at t1",
                       description="Train one base run; at each t0 spawn a twin perturbed by eps (and one "
                                   "control twin with eps=0); train all on identical batches; at each t1 "
                                   "compare every twin with the base (parameter dissimilarity, loss barrier on "
                                   "train and test subsets, prediction disagreement). Resumes after an "
                                   "interruption (arXiv 2505.13900, Fig. 3).")
    _add_run_args(p, d)
    p.set_defaults(steps=None)  # default: the last t1 (the lr schedule spans --steps)
    g = p.add_argument_group("chaos grid")
    g.add_argument("--t0", required=True, metavar="LIST", help="spawn iterations, comma-separated")
    g.add_argument("--t1", required=True, metavar="LIST", help="comparison iterations, comma-separated")
    g.add_argument("--eps", type=float, default=1e-7, help="perturbation size (default: 1e-7, the paper's)")
    g.add_argument("--norm", default="l2", choices=["l2", "linf", "gaussian", "relative"],
                   help="l2: |delta|_2 = eps over all parameters; linf: each coordinate +-eps; gaussian: each "
                        "coordinate N(0, eps^2); relative: |delta|_2 = eps |theta|_2 (default: l2)")
    g.add_argument("--perturb-seed", type=int, default=0, help="seed of the perturbation directions (default: 0)")
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
                        "auto: vmap on CUDA, loop on CPU")
    g.add_argument("--trace-every", type=int, default=10, metavar="K",
                   help="record every twin's L2 distance and 1-cos to the base every K steps (0: off; default 10)")
    g.add_argument("--out", required=True, metavar="CHAOS.h5", help="results (HDF5; see docs/FORMAT.md)")
    g.add_argument("--summary", metavar="CHAOS.json",
                   help="also write a JSON summary with one record per (t0, t1, member)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it holds a different job")
    _add_data_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("reproduce", help="the whole study: train, eNTKs, chaos grid, cone analysis, report",
                       description="Reproduce the Chaos and Cone effects (arXiv 2505.13900) in one command: "
                                   "train a base run with a checkpoint schedule dense early and log-spaced "
                                   "later, compute the eNTK of every checkpoint, run the chaos grid, analyse "
                                   "the kernel trajectory, and write figures (PNG, PDF), report.md and a "
                                   "self-contained report.html into --out. Rerunning resumes every stage.")
    p.add_argument("--preset", default="cpu-small", choices=["cpu-small", "gpu-paper"],
                   help="cpu-small: minutes on 2 CPU cores (cnn, 10,000 images, 600 steps); gpu-paper: the "
                        "paper's setting (full CIFAR-10, 160 epochs) (default: cpu-small)")
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
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    _add_data_args(p)
    # Embedded default: real CIFAR-10 when --data-root is given, else synthetic data (the report says which).
    p.set_defaults(data=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("data", help="load (decode and cache) a dataset and describe it",
                       description="Load a dataset, decoding and caching CIFAR-10 JPEGs on first "
                                   "use, and print its size, class counts and pixel statistics.")
    _add_data_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", metavar="FILE", help="also write the description as JSON")

    p = sub.add_parser("ext", help="build or inspect the compiled csrc/ extension (fused ops)",
                       description="Build the C++ (and, with a GPU, CUDA) extension ahead of time, or report "
                                   "which backends of the fused ops can run here. It is otherwise built on "
                                   "first use; ENTK_EXT=0 disables it, ENTK_EXT_DIR moves its build cache.")
    p.add_argument("action", choices=["build", "status"], help="build: compile now; status: report only")
    p.add_argument("--device", default="auto", help="auto (CPU, and CUDA if available), cpu, cuda")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    return parser


def _cmd_train(args) -> int:
    from .train import parse_iterations, train

    cfg = _train_config(args, parse_iterations(args.checkpoints, args.steps) if args.out else [])
    res = train(cfg, out=args.out, device=args.device, overwrite=args.overwrite,
                quiet=args.quiet, cache_dir=args.cache_dir)
    print(f"{cfg.model} on {cfg.data}: {res.describe()}")
    print(f"final train accuracy {res.train_acc:.4f}  test accuracy {res.test_acc:.4f}")
    if args.out:
        print(f"checkpoints {cfg.checkpoints[:8]}{' ...' if len(cfg.checkpoints) > 8 else ''} "
              f"saved in {args.out}")
    if args.json:
        rec = {"config": cfg.to_dict(), **{k: v for k, v in vars(res).items() if k != "out"},
               "out": str(res.out) if res.out else None}
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=2)
    return 0


def _cmd_ntk(args) -> int:
    import torch

    from .determinism import resolve_device
    from .ntk import checkpoint_kernels

    if args.probe < 1:
        raise EngineError(f"--probe must be >= 1, got {args.probe}")
    if args.budget_gb <= 0:
        raise EngineError(f"--budget-gb must be > 0, got {args.budget_gb}")
    its = None
    if args.checkpoints != "all":
        try:
            its = [int(v) for v in args.checkpoints.split(",") if v.strip()]
        except ValueError:
            raise EngineError(
                f"--checkpoints must be 'all' or comma-separated integers, got {args.checkpoints!r}") from None
    t0 = time.perf_counter()
    res = checkpoint_kernels(args.run, args.out, iterations=its, probe=args.probe, probe_seed=args.probe_seed,
                             probe_split=args.probe_split, kernel=args.kernel, backend=args.backend,
                             ops_backend=args.ops_backend,
                             dtype=torch.float64 if args.float64 else torch.float32,
                             device=resolve_device(args.device), budget_bytes=int(args.budget_gb * 2**30),
                             data_root=args.data_root, cache_dir=args.cache_dir, overwrite=args.overwrite,
                             quiet=args.quiet)
    its = res.iterations
    size = res.store.job["size"]
    print(f"{len(its)} kernels of {size}x{size} ({args.kernel}) in {args.out}, {time.perf_counter() - t0:.1f} s")
    if res.seconds:
        per = sum(res.seconds.values()) / len(res.seconds)
        print(f"  {per:.2f} s per checkpoint kernel")
    width = max(len(str(i)) for i in its) + 1
    print("kernel distance S (rows/cols: iteration)")
    print(" " * width + "".join(f"{i:>{max(width, 8)}}" for i in its))
    for i, row in zip(its, res.distance.tolist(), strict=True):
        print(f"{i:>{width}}" + "".join(f"{v:>{max(width, 8)}.4f}" for v in row))
    return 0


def _ints(s: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise EngineError(f"{flag} must be comma-separated integers, got {s!r}") from None


def _cmd_chaos(args) -> int:
    from .determinism import resolve_device
    from .jobs import ChaosConfig, run_chaos, write_summary

    t0, t1 = _ints(args.t0, "--t0"), _ints(args.t1, "--t1")
    if args.steps is None:
        args.steps = max(t1, default=0)  # the run only needs to reach the last comparison
    cfg = ChaosConfig(train=_train_config(args, []), t0=t0, t1=t1, eps=args.eps, norm=args.norm,
                      perturb_seed=args.perturb_seed, weights_only=args.weights_only, allow_zero=args.allow_zero,
                      eval_train=args.eval_n, eval_test=args.eval_n, alphas=args.alphas, bn=args.bn,
                      strategy=args.strategy, trace_every=args.trace_every).validate()
    res = run_chaos(cfg, args.out, device=resolve_device(args.device), overwrite=args.overwrite,
                    quiet=args.quiet, cache_dir=args.cache_dir)
    if args.summary:
        write_summary(res, args.summary)
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
    return 0


def _cmd_reproduce(args) -> int:
    from .determinism import resolve_device
    from .report import reproduce

    lists = {k: _ints(getattr(args, k), f"--{k}") if getattr(args, k) else None
             for k in ("checkpoints", "t0", "t1", "seeds")}
    data = args.data or ("cifar10" if args.data_root else "synthetic")
    reproduce(args.out, preset_name=args.preset, model=args.model, data=data, data_root=args.data_root,
              cache_dir=args.cache_dir, steps=args.steps, probe=args.probe, n_train=args.n_train,
              n_test=args.n_test, subset_seed=args.subset_seed, eval_n=args.eval_n, eps=args.eps,
              trace_every=args.trace_every, window=args.window, schedule=args.schedule,
              analyse_only=args.analyse_only,
              device=resolve_device(args.device), quiet=args.quiet, **lists)
    return 0


def _cmd_data(args) -> int:
    from .data import load_dataset

    kwargs = {}
    if args.data == "cifar10":
        if not args.data_root:
            raise EngineError(_NEED_ROOT)
        kwargs = {"cache_dir": args.cache_dir, "progress": False if args.quiet else None}
    t0 = time.perf_counter()
    ds = load_dataset(args.data, args.data_root, **kwargs)
    if args.n_train or args.n_test:
        ds = ds.subset(args.n_train, args.n_test, seed=args.subset_seed)
    dt = time.perf_counter() - t0
    import torch

    desc = {"name": ds.name, "source": ds.source, "n_train": len(ds.y_train), "n_test": len(ds.y_test),
            "classes": list(ds.classes), "image_shape": list(ds.image_shape),
            "train_per_class": torch.bincount(ds.y_train, minlength=ds.num_classes).tolist(),
            "test_per_class": torch.bincount(ds.y_test, minlength=ds.num_classes).tolist(),
            "pixel_mean": (ds.x_train.float().mean((0, 2, 3)) / 255).tolist(),
            "pixel_std": (ds.x_train.float().std((0, 2, 3)) / 255).tolist(),
            "load_seconds": round(dt, 3)}
    print(ds.describe())
    print(f"  loaded in {dt:.2f} s")
    print(f"  train per class: {desc['train_per_class']}")
    print(f"  test per class:  {desc['test_per_class']}")
    print("  pixel mean " + ", ".join(f"{v:.4f}" for v in desc["pixel_mean"])
          + "   std " + ", ".join(f"{v:.4f}" for v in desc["pixel_std"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(desc, f, indent=2)
    return 0


def _cmd_ext(args) -> int:
    import torch

    from .ops import BackendUnavailableError
    from .ops import ext as ops_ext
    from .ops.backend import triton_unavailable_reason

    kinds = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if args.device == "auto" and not torch.cuda.is_available():
        kinds = ["cpu"]
    failed = False
    for kind in kinds:
        dev = torch.device(kind)
        built = ops_ext.built_path(kind)
        if args.action == "status":
            why = ops_ext.unavailable_reason(kind) or "buildable here"
            print(f"ext ({kind}): " + (f"built: {built}" if built else f"not built yet (entk ext build; {why})"))
        else:
            try:
                t0 = time.perf_counter()
                mod = ops_ext.load(dev, verbose=args.verbose)
                print(f"ext ({kind}): ready in {time.perf_counter() - t0:.1f} s: {mod.__file__}")
            except BackendUnavailableError as e:
                failed = True
                print(f"ext ({kind}): {e}")
        why = triton_unavailable_reason(dev)
        print(f"triton ({kind}): {'available' if why is None else why}")
    return 1 if failed and args.action == "build" else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        commands = {"train": _cmd_train, "ntk": _cmd_ntk, "chaos": _cmd_chaos, "reproduce": _cmd_reproduce,
                    "data": _cmd_data, "ext": _cmd_ext}
        return commands[args.command](args)
    except EngineError as e:
        print(f"entk {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"entk {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
