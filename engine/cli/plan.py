"""`entk plan`: each layer's contraction strategy and predicted cost for one kernel tile, and the floor."""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from ..errors import EngineError
from ..ntk.budget import GiB
from .options import add_json, check_outputs, write_json


def _shape(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 3,32,32, got {s!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 3,32,32, got {s!r}")
    return dims


def add_parser(sub) -> argparse.ArgumentParser:
    from ..models import MODEL_NAMES

    p = sub.add_parser("plan", help="per-layer contraction plan (materialise vs spatial pairs) and the FLOP floor",
                       description="For a model and a kernel tile of N (x N2) inputs, print per layer the "
                                   "multiply-adds and bytes of both ways to get its Gram block (materialise: "
                                   "per-sample gradient columns then one GEMM; pairs: the spatial-pair Gram), "
                                   "the strategy chosen, and the floor: the backward-data passes plus each "
                                   "layer's cheaper strategy. Nothing is computed but one forward of one sample.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", choices=MODEL_NAMES, default="resnet20",
                   help="a built-in model, freshly initialised (default: resnet20)")
    g.add_argument("--model-fn", metavar="PKG.MOD:FACTORY",
                   help="your own model: an importable function returning a torch.nn.Module (logits (N, C))")
    p.add_argument("--classes", type=int, default=10, help="outputs C of a built-in model (default: 10)")
    p.add_argument("--input-shape", type=_shape, default=(3, 32, 32), metavar="C,H,W",
                   help="shape of one float input (default: 3,32,32, CIFAR-10)")
    p.add_argument("--n", type=int, default=32, help="inputs on the tile's rows (default: 32)")
    p.add_argument("--n2", type=int, help="inputs on the tile's columns, a cross-kernel (default: symmetric)")
    p.add_argument("--kernel", default="full", choices=["full", "traced", "diagonal", "pntk"],
                   help="kernel kind, as in entk kernel (default: full)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the products: bfloat16 halves the operand bytes (default: float32)")
    p.add_argument("--contraction", default="auto", choices=["auto", "materialise", "pairs"],
                   help="auto: the cheaper strategy per layer; materialise or pairs: forced wherever possible")
    p.add_argument("--budget-gb", type=float, default=None, metavar="GB",
                   help="entk's working-memory budget to lay the inputs' row blocks out for (default: entk's, "
                        "4): below what one block of all inputs needs, blocks are recomputed per tile pair")
    add_json(p, "also write the plan as JSON: per layer both costs and the strategy, the floor, the row blocks")
    p.set_defaults(handler=run)
    return p


def _blocks_line(b, budget: int) -> str:
    head = (f"row blocks at a budget of {budget / GiB:.2f} GiB (block data {b.per_input / 2**20:.1f} MiB per input; "
            f"one block of all {b.inputs} inputs needs {b.one_block_budget / GiB:.2f} GiB):")
    if b.recompute == 1:
        return f"{head} one block, nothing recomputed"
    return (f"{head} {b.blocks} row blocks of {b.block} inputs, {b.block_passes} block passes: forward, backward "
            f"and column formation run {b.recompute:.1f}x the inputs (--budget-gb "
            f"{math.ceil(b.one_block_budget / GiB * 100) / 100:.2f} keeps them in one block)")


def run(args) -> int:
    from ..models import build_model
    from ..ntk import DEFAULT_BUDGET, entk_blocks, plan

    if args.n < 1 or (args.n2 is not None and args.n2 < 1):
        raise EngineError(f"--n and --n2 must be >= 1, got {args.n} and {args.n2}")
    if args.classes < 1:
        raise EngineError(f"--classes must be >= 1, got {args.classes}")
    if args.kernel == "diagonal" and args.n2 is not None:
        raise EngineError("--kernel diagonal has no cross-kernel: drop --n2")
    if args.budget_gb is not None and not args.budget_gb > 0:
        raise EngineError(f"--budget-gb must be > 0, got {args.budget_gb}")
    check_outputs(files=[("--json", args.json)])
    if args.model_fn:
        from ..jobs.kernel_job import load_model_fn

        model = load_model_fn(args.model_fn)
        name = args.model_fn
    else:
        model = build_model(args.model, num_classes=args.classes)
        name = args.model
    # Only the sizes and one sample matter: the inputs are shapes, not data.
    x1 = torch.zeros(args.n, *args.input_shape)
    x2 = None if args.n2 is None else torch.zeros(args.n2, *args.input_shape)
    dtype = torch.bfloat16 if args.compute_dtype == "bfloat16" else None
    pl = plan(model.eval(), x1, x2, kernel=args.kernel, compute_dtype=dtype, contraction=args.contraction)
    print(f"model {name}, input {'x'.join(map(str, args.input_shape))}, {args.compute_dtype}, "
          f"contraction {args.contraction}")
    print(pl.table())
    budget = DEFAULT_BUDGET if args.budget_gb is None else int(args.budget_gb * GiB)
    blocks = entk_blocks(model.eval(), x1, x2, kernel=args.kernel, budget_bytes=budget)
    print(_blocks_line(blocks, budget))
    if args.json:
        write_json(args.json, "plan", {"model": name, "input_shape": list(args.input_shape),
                                       "compute_dtype": args.compute_dtype, "contraction": args.contraction,
                                       **pl.as_dict(), "budget_bytes": budget,
                                       "blocks": {**dataclasses.asdict(blocks), "recompute": blocks.recompute}})
    return 0
