"""``entk kernel``, ``entk kernel-predict``, ``entk kernel-info``: one large kernel on disk, and tools on it.

``add_parser(sub)`` registers the three subcommands; each parser's ``handler`` is its command
function (``cmd_kernel``, ``cmd_kernel_predict``, ``cmd_kernel_info``).
"""

from __future__ import annotations

import sys
import time

from ..errors import EngineError
from ..jobs.distributed import Dist
from ..jobs.kernel_job.plan import DEFAULT_PROCESS_MEMORY
from ..ntk.budget import DEFAULT_BUDGET
from .options import GiB, add_json, budget_bytes, check_outputs, positive_float, seed, write_json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "kernel", help="one large eNTK (train x train, test x train, ...) tile by tile into HDF5, resumable",
        description="Compute one empirical NTK of a model state on seeded, class-balanced inputs, tile by tile "
                    "into an HDF5 file (symmetric kernels store only the upper-triangle tiles), never holding the "
                    "kernel whole: the process's peak memory is bounded by --memory-gb, which sets the tile size. "
                    "Rerunning the same command resumes at the first missing tile (also after SIGKILL); the result is "
                    "bit-identical. Under torchrun --nproc-per-node K the tiles are shared over the K ranks "
                    "(cuda:LOCAL_RANK or the CPU with gloo). Read the result with engine.ntk.open_kernel(path).")
    g = p.add_argument_group("model state (either --run or --model-fn)")
    g.add_argument("--run", metavar="RUN.h5",
                   help="a run file of entk train; inputs come from the run's own data subset")
    g.add_argument("--checkpoint", type=int, metavar="IT",
                   help="iteration of the run's checkpoint (default: the last completed one)")
    g.add_argument("--model-fn", metavar="PKG.MOD:FACTORY",
                   help="your own model: an importable function returning a torch.nn.Module (logits (N, C))")
    g.add_argument("--state", metavar="PATH", help="state dict (torch.save) to load into the --model-fn model")
    g.add_argument("--data", default="synthetic", choices=["synthetic", "cifar10"],
                   help="dataset for --model-fn inputs: synthetic (default) or cifar10 (needs --data-root)")
    g.add_argument("--data-root", metavar="PATH", help="CIFAR-10 location (or where the run's data moved to)")
    g.add_argument("--cache-dir", metavar="DIR", help="decoded-CIFAR-10 cache directory")
    g = p.add_argument_group("inputs and kernel")
    g.add_argument("--x1", required=True, metavar="SPLIT:N",
                   help="row inputs: N seeded class-balanced images of train or test (e.g. train:5000)")
    g.add_argument("--x2", metavar="SPLIT:N",
                   help="column inputs for a cross-kernel (e.g. --x1 test:1000 --x2 train:5000); "
                        "default: x1 (symmetric)")
    g.add_argument("--seed", type=seed, default=0, help="seed of the input selection (default: 0)")
    g.add_argument("--kernel", default="full", choices=["full", "traced", "diagonal", "pntk"],
                   help="full: (N1*C)x(N2*C), row n*C+c; traced: N1xN2 summed over outputs; diagonal: (N, C, C) "
                        "per-sample blocks; pntk: N1xN2 kernel of sum_c f_c/sqrt(C) (default: full)")
    g.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="precision of the kernel products (stored as float32; float64 stores float64)")
    g = p.add_argument_group("resources")
    g.add_argument("--memory-gb", type=positive_float,
                   help="peak memory of each process, what a scheduler sees (torch, model, data, one tile pair); "
                        f"sets the tile size (default: {DEFAULT_PROCESS_MEMORY / GiB:g})")
    g.add_argument("--budget-gb", type=positive_float,
                   help="deprecated alias of --memory-gb (the same whole-process memory, not the working memory "
                        "of entk ntk --budget-gb)")
    g.add_argument("--disk-budget-gb", type=positive_float,
                   help="disk allowed for the Jacobian blocks beside --out (default: half the free space); "
                        "above it they are recomputed per tile pair")
    g.add_argument("--strategy", default="auto", choices=["auto", "stored-jacobian", "recompute"],
                   help="Jacobian blocks: auto (store them when they fit the disk budget), stored-jacobian, recompute")
    g.add_argument("--contraction", default="auto", choices=["auto", "materialise", "pairs"],
                   help="each layer's kernel block from per-sample gradient columns (materialise), spatial pairs "
                        "(pairs), or the cheaper per layer (auto, default; see entk plan); same kernel")
    g.add_argument("--tile", type=int, metavar="N", help="inputs per tile side (default: from --memory-gb)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA if available; cuda:LOCAL_RANK under torchrun), cpu, cuda, cuda:N")
    p.add_argument("--out", required=True, metavar="KERNEL.h5", help="output file (layout in docs/FORMAT.md)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a different job")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json(p, "also write a JSON summary (rank 0)")
    p.set_defaults(handler=cmd_kernel)

    p = sub.add_parser(
        "kernel-predict", help="NTK prediction: kernel ridge regression from stored train and test x train kernels",
        description="Solve (K_train + lambda I) alpha = Y on one-hot train labels and predict K_test_train alpha, "
                    "streaming over the stored tiles; lambda = ridge * trace(K_train)/M (neural-tangents' relative "
                    "diag_reg). Prints the test accuracy.")
    p.add_argument("--train", required=True, metavar="K_TRAIN.h5",
                   help="train x train kernel (entk kernel --x1 train:N)")
    p.add_argument("--cross", required=True, metavar="K_TEST_TRAIN.h5",
                   help="test x train kernel (entk kernel --x1 test:M --x2 train:N, same model and seed)")
    p.add_argument("--ridge", type=positive_float, default=1e-3, help="relative ridge (default: 1e-3)")
    p.add_argument("--solver", default="auto", choices=["auto", "cholesky", "cg"],
                   help="cholesky: dense train kernel in memory; cg: conjugate gradients on tiles; "
                        "auto: by --budget-gb")
    p.add_argument("--budget-gb", type=positive_float, default=DEFAULT_BUDGET / GiB,
                   help="working memory of the solve (not the whole process's): a dense solve when the train "
                        f"kernel fits (default: {DEFAULT_BUDGET / GiB:g})")
    add_json(p, "also write the result as JSON")
    p.set_defaults(handler=cmd_kernel_predict)

    p = sub.add_parser("kernel-info", help="shape, completeness, top eigenvalues, participation ratio, label alignment",
                       description="Describe a stored kernel: its job, tiles done, and (when complete) the top-k "
                                   "eigenvalues by Lanczos on tile mat-vecs, the participation ratio trace^2/|K|_F^2 "
                                   "(an effective rank) and "
                                   "the kernel-target alignment with the labels, all streaming over tiles.")
    p.add_argument("kernel", metavar="KERNEL.h5", help="a file written by entk kernel")
    p.add_argument("--top-k", type=int, default=5, help="number of eigenvalues (default: 5; 0 skips the spectrum)")
    add_json(p, "also write the description as JSON")
    p.set_defaults(handler=cmd_kernel_info)


def cmd_kernel(args) -> int:
    from ..data import load_dataset
    from ..jobs.kernel_job import kernel_job, load_model_fn

    if (args.run is None) == (args.model_fn is None):
        raise EngineError("give either --run RUN.h5 (with --checkpoint IT) or --model-fn PKG.MOD:FACTORY")
    if args.run is None and args.checkpoint is not None:
        raise EngineError("--checkpoint needs --run")
    if args.state and not args.model_fn:
        raise EngineError("--state needs --model-fn")
    if args.tile is not None and args.tile < 1:
        raise EngineError(f"--tile must be >= 1, got {args.tile}")
    rank0 = Dist.launched_rank() == 0  # under torchrun, rank 0 checks, prints and writes --json
    memory_flag, memory_gb = "--memory-gb", args.memory_gb
    if args.budget_gb is not None:
        if args.memory_gb is not None:
            raise EngineError("--budget-gb is a deprecated alias of --memory-gb; give one of them")
        if rank0:
            print("entk kernel: warning: --budget-gb is deprecated; use --memory-gb (the same whole-process memory)",
                  file=sys.stderr)
        memory_flag, memory_gb = "--budget-gb", args.budget_gb
    if rank0:
        check_outputs(files=[("--out", args.out), ("--json", args.json)], inputs=[("--run", args.run)])
    kw = {}
    if args.model_fn:
        model = load_model_fn(args.model_fn, args.state)
        if args.data == "cifar10" and not args.data_root:
            raise EngineError("--data cifar10 needs --data-root PATH")
        dkw = {"cache_dir": args.cache_dir, "progress": False if args.quiet else None} if args.data == "cifar10" else {}
        kw = {"model": model, "dataset": load_dataset(args.data, args.data_root, **dkw), "model_name": args.model_fn}
    else:
        kw = {"run": args.run, "checkpoint": args.checkpoint}
    res = kernel_job(args.out, x1=args.x1, x2=args.x2, kernel=args.kernel, compute_dtype=args.compute_dtype,
                     memory_bytes=None if memory_gb is None else budget_bytes(memory_flag, memory_gb),
                     disk_budget_bytes=None if args.disk_budget_gb is None
                     else budget_bytes("--disk-budget-gb", args.disk_budget_gb),
                     tile_inputs=args.tile, strategy=args.strategy, seed=args.seed, device=args.device,
                     contraction=args.contraction,
                     data_root=args.data_root, cache_dir=args.cache_dir, overwrite=args.overwrite,
                     quiet=args.quiet, log=print if rank0 else None, **kw)
    if rank0:
        K = res.kernel
        done = int(K.complete.sum())
        print(f"{args.kernel} kernel {'x'.join(map(str, K.shape))} in {args.out}: {done}/{res.n_tiles} tiles "
              f"complete ({res.computed} computed by rank 0 now), {res.seconds:.1f} s")
        if args.json:
            write_json(args.json, "kernel", {
                "out": str(res.path), "shape": list(K.shape), "strategy": res.strategy, "reason": res.reason,
                "n_tiles": res.n_tiles, "complete": done, "seconds": res.seconds, "world": res.world,
                "computed_by_rank0": res.computed, "phase_seconds_rank0": res.phase_seconds, "job": K.attrs})
    return 0


def cmd_kernel_predict(args) -> int:
    from ..analysis.kernel_tools import kernel_predict

    check_outputs(files=[("--json", args.json)], inputs=[("--train", args.train), ("--cross", args.cross)])
    t0 = time.perf_counter()
    budget = budget_bytes("--budget-gb", args.budget_gb)
    p = kernel_predict(args.train, args.cross, ridge=args.ridge, solver=args.solver, budget_bytes=budget)
    n = p.predictions.shape[0]
    how = "Cholesky" if p.solver == "cholesky" else f"CG, {p.iterations} iterations"
    acc = "n/a (no test labels)" if p.accuracy is None else f"{p.accuracy:.4f}"
    print(f"test accuracy {acc} on {n} test inputs (ridge {args.ridge:g} x mean diagonal = {p.ridge_abs:.4g}; "
          f"{how}; {time.perf_counter() - t0:.1f} s)")
    if args.json:
        write_json(args.json, "kernel-predict", {
            "accuracy": p.accuracy, "n_test": n, "ridge": p.ridge, "ridge_abs": p.ridge_abs, "solver": p.solver,
            "iterations": p.iterations, "train": args.train, "cross": args.cross})
    return 0


def cmd_kernel_info(args) -> int:
    from ..analysis.kernel_tools import kernel_norms, kernel_target_alignment, participation_ratio, top_eigenpairs
    from ..store import open_kernel

    check_outputs(files=[("--json", args.json)], inputs=[("kernel", args.kernel)])
    K = open_kernel(args.kernel)
    a = K.attrs
    done = int(K.complete.sum())
    desc = {"kernel": a.get("kernel"), "shape": list(K.shape), "model": a.get("model"), "run": a.get("run"),
            "checkpoint": a.get("checkpoint"), "x1": f"{a.get('x1_split')}:{a.get('x1_n')}",
            "x2": None if a.get("x2_split") is None else f"{a.get('x2_split')}:{a.get('x2_n')}",
            "dtype": a.get("dtype"),
            "tiles": [done, len(K.complete)], "tile_inputs": a.get("tile_inputs")}
    print(f"{args.kernel}: {desc['kernel']} kernel {'x'.join(map(str, K.shape))} of {desc['model']} "
          f"(checkpoint {desc['checkpoint']}), x1 {desc['x1']}" + (f", x2 {desc['x2']}" if desc["x2"] else "")
          + f"; {done}/{len(K.complete)} tiles complete")
    if K.is_complete and K.ndim == 2 and K.symmetric:
        tr, fro = kernel_norms(K)
        desc.update(trace=tr, frobenius=fro, participation_ratio=participation_ratio(K),
                    alignment=kernel_target_alignment(K))
        print(f"  trace {tr:.6g}  |K|_F {fro:.6g}  participation ratio {desc['participation_ratio']:.3f}  "
              f"label alignment {desc['alignment']:.4f}")
        if args.top_k > 0:
            eig = top_eigenpairs(K, min(args.top_k, K.shape[0]))
            desc["eigenvalues"] = eig.values.tolist()
            desc["eigen_residuals"] = eig.residuals.tolist()
            print("  top eigenvalues " + " ".join(f"{v:.6g}" for v in eig.values)
                  + f"  (Lanczos, {eig.iterations} steps, max residual {eig.residuals.max():.2g})")
    if args.json:
        write_json(args.json, "kernel-info", desc)
    return 0
