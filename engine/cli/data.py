"""`entk data`: load (decode and cache) a dataset and describe it."""

from __future__ import annotations

import argparse
import time

import torch

from ..data import load_dataset
from ..errors import EngineError
from .options import NEED_ROOT, add_data_args, add_json, add_quiet, check_outputs, write_json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="load (decode and cache) a dataset and describe it",
                       description="Load a dataset, decoding and caching CIFAR-10 JPEGs on first "
                                   "use, and print its size, class counts and pixel statistics.")
    add_data_args(p)
    add_quiet(p)
    add_json(p, "also write the description as JSON")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    kwargs = {}
    if args.data == "cifar10":
        if not args.data_root:
            raise EngineError(NEED_ROOT)
        kwargs = {"cache_dir": args.cache_dir, "progress": False if args.quiet else None}
    check_outputs(files=[("--json", args.json)])
    t0 = time.perf_counter()
    ds = load_dataset(args.data, args.data_root, **kwargs)
    if args.n_train or args.n_test:
        ds = ds.subset(args.n_train, args.n_test, seed=args.subset_seed)
    dt = time.perf_counter() - t0
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
        write_json(args.json, "data", desc)
    return 0
