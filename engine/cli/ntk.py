"""`entk ntk`: eNTKs of a run's checkpoints on a fixed probe set, and their distances."""

from __future__ import annotations

import argparse
import time

import torch

from ..determinism import resolve_device
from ..errors import EngineError
from ..jobs import checkpoint_kernels
from ..jobs.distributed import Dist
from ..ntk.budget import DEFAULT_BUDGET
from ..store import RunFile
from ..train import parse_iterations
from .options import (
    GiB,
    add_data_root,
    add_device,
    add_json,
    add_overwrite,
    add_quiet,
    budget_bytes,
    check_outputs,
    positive_float,
    seed,
    write_json,
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ntk", help="eNTKs of a run's checkpoints on a fixed probe set, and their distances",
                       description="Compute the empirical NTK H = J J^T of checkpoints of a training run "
                                   "on a fixed, seeded, class-balanced probe set (BatchNorm in eval mode), "
                                   "store them in one HDF5 file and print the pairwise kernel distances "
                                   "S = 1 - <H1,H2>_F / (|H1| |H2|). Rerunning resumes at the first missing "
                                   "checkpoint. Under torchrun --nproc-per-node K the checkpoints are shared over the "
                                   "K ranks (checkpoint k to rank k % K; cuda:LOCAL_RANK or the CPU with gloo), "
                                   "bit-identical to one process.")
    p.add_argument("--run", required=True, metavar="RUN.h5", help="the run file written by entk train")
    p.add_argument("--checkpoints", default="all", metavar="LIST",
                   help="iterations to use: 'all' (every completed checkpoint; default) or a list as in "
                        "entk train, comma-separated, items may be log:N or every:K over the run's steps "
                        "(each must be a completed checkpoint of the run)")
    p.add_argument("--probe", type=int, default=100, metavar="N",
                   help="number of probe images (class-balanced, seeded; default: 100)")
    p.add_argument("--probe-seed", type=seed, default=0, help="seed of the probe selection (default: 0)")
    p.add_argument("--probe-split", default="test", choices=["test", "train"],
                   help="which split the probe images come from (default: test)")
    p.add_argument("--out", required=True, metavar="KERNELS.h5", help="output HDF5 file (see docs/FORMAT.md)")
    p.add_argument("--kernel", default="full", choices=["full", "traced", "diagonal", "pntk"],
                   help="full: (N*C)x(N*C) with row n*C+c; traced: NxN summed over the C outputs; diagonal: the "
                        "per-sample CxC blocks, stored (N*C)xC; pntk: NxN kernel of sum_c f_c/sqrt(C)")
    p.add_argument("--params", metavar="NAME,...",
                   help="the kernel of these parameters only (names as in model.named_parameters(); default: all)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the layer products and Gram tiles (bfloat16: float32 accumulation, "
                        "float32 kernel; default: float32)")
    p.add_argument("--backend", default="auto", choices=["auto", "structured", "reference"],
                   help="Jacobian backend: structured (fast per-layer rules) or reference (torch.func)")
    p.add_argument("--ops-backend", default="auto", choices=["auto", "torch", "triton", "ext"],
                   help="fused Gram tiles and kernel inner products: torch (reference), triton, ext (csrc/), auto")
    p.add_argument("--contraction", default="auto", choices=["auto", "materialise", "pairs"],
                   help="each layer's kernel block from per-sample gradient columns (materialise), spatial pairs "
                        "(pairs), or the cheaper per layer (auto, default; see entk plan); same kernel")
    p.add_argument("--float64", action="store_true", help="accumulate the Gram in float64 (default: float32)")
    p.add_argument("--budget-gb", type=positive_float, default=DEFAULT_BUDGET / GiB,
                   help="working memory of each kernel and of the distances (block data, Jacobian chunks, tiles; not "
                        "the whole process's memory, which entk kernel bounds with --memory-gb); "
                        "a budget too small for one sample is refused before any work "
                        f"(default: {DEFAULT_BUDGET / GiB:g})")
    add_device(p)
    add_data_root(p, "CIFAR-10 location if it moved since training")
    p.add_argument("--cache-dir", metavar="DIR", help="decoded-CIFAR-10 cache directory")
    add_overwrite(p)
    add_quiet(p)
    add_json(p, "also write a JSON summary: iterations, kernel size, seconds per kernel, the distance matrix")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    if args.probe < 1:
        raise EngineError(f"--probe must be >= 1, got {args.probe}")
    its = None
    if args.checkpoints != "all":
        its = parse_iterations(args.checkpoints, RunFile(args.run).steps, include_final=False)
        if not its:
            raise EngineError(f"--checkpoints {args.checkpoints!r} selects no iterations")
    rank0 = Dist.launched_rank() == 0  # under torchrun, rank 0 checks, prints and writes --json
    if rank0:
        check_outputs(files=[("--out", args.out), ("--json", args.json)], inputs=[("--run", args.run)])
    t0 = time.perf_counter()
    res = checkpoint_kernels(args.run, args.out, iterations=its, probe=args.probe, probe_seed=args.probe_seed,
                             probe_split=args.probe_split, kernel=args.kernel, backend=args.backend,
                             param_names=None if not args.params else [n.strip() for n in args.params.split(",")],
                             compute_dtype=torch.bfloat16 if args.compute_dtype == "bfloat16" else None,
                             ops_backend=args.ops_backend, contraction=args.contraction,
                             dtype=torch.float64 if args.float64 else torch.float32,
                             device=resolve_device(args.device),
                             budget_bytes=budget_bytes("--budget-gb", args.budget_gb),
                             data_root=args.data_root, cache_dir=args.cache_dir, overwrite=args.overwrite,
                             quiet=args.quiet)
    if not rank0:
        return 0
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
    if args.json:
        write_json(args.json, "ntk", {
            "run": str(args.run), "out": str(args.out), "kernel": args.kernel, "size": size,
            "params": args.params or "all", "compute_dtype": args.compute_dtype,
            "probe": args.probe, "probe_seed": args.probe_seed, "probe_split": args.probe_split,
            "iterations": list(its), "computed": sorted(res.seconds),
            "seconds_per_kernel": {str(k): v for k, v in res.seconds.items()},
            "distance": res.distance.tolist(), "seconds": round(time.perf_counter() - t0, 3)})
    return 0
