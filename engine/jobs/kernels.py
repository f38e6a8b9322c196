"""The eNTKs of a training run's checkpoints on a fixed probe set, into a KernelStore.

This is the job behind ``entk ntk``: every checkpoint's kernel is written as soon as
it is computed, so an interrupted job resumes at the first missing checkpoint; the
pairwise kernel distances are computed in one streaming pass once all are there.

Under ``torchrun`` (``WORLD_SIZE > 1``) the checkpoints are shared over the ranks: checkpoint
k (in the order of ``iterations``) goes to rank ``k % world``, on ``cuda:LOCAL_RANK`` or the
CPU. The file is written as ``entk kernel`` writes its tiles, without parallel HDF5: rank 0
creates it with its whole layout fixed; each rank then writes only the raw bytes of its own
kernels and their completion flags, at fixed offsets; after a barrier rank 0 alone computes
the distances. A kernel is a pure function of the checkpoint and the probes, so the file is
bit-identical for any number of ranks, and a rerun after any rank died resumes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import Dataset, normalize
from ..errors import ConfigError, RunFileError, parse_enum
from ..heap import with_freed_memory_reused
from ..models import build_model
from ..ntk import (
    DEFAULT_BUDGET,
    KernelKind,
    distance_from_gram,
    entk,
    kernel_gram,
    num_outputs,
    parameter_layout,
    probe_hash,
)
from ..progress import progress as progress_bar
from ..store import KernelStore, RunFile, data_mismatch, data_record, kernel_name
from ..train import TrainConfig, prepare_data
from .distributed import Dist, rank_device


@dataclass
class CheckpointKernels:
    store: KernelStore
    iterations: list[int]
    distance: torch.Tensor   # (T, T) float64
    seconds: dict[int, float]
    notes: list[str] = field(default_factory=list)  # what the job told the user (also on stderr)


def probe_set(ds: Dataset, n: int, *, seed: int = 0, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, class-balanced probe set of ``n`` images of ``split``: normalized float
    images ``(n, 3, 32, 32)`` and labels."""
    if split not in ("train", "test"):
        raise ConfigError(f"probe split must be 'train' or 'test', got {split!r}")
    avail = len(ds.y_test if split == "test" else ds.y_train)
    if not 1 <= n <= avail:
        raise ConfigError(f"probe size must be in [1, {avail}] ({split} images available), got {n}")
    sub = ds.subset(None, n, seed=seed) if split == "test" else ds.subset(n, None, seed=seed)
    x, y = (sub.x_test, sub.y_test) if split == "test" else (sub.x_train, sub.y_train)
    return normalize(x, ds.mean, ds.std), y


def _check_ops_backend(ops_backend: str, device: torch.device) -> None:
    from ..ops import ext
    from ..ops.backend import OpsBackend, parse_backend, require_triton

    b = parse_backend(ops_backend)
    if b is OpsBackend.TRITON:
        require_triton("ops backend", device)
    elif b is OpsBackend.EXT:
        ext.load(device)


@with_freed_memory_reused
def checkpoint_kernels(run_path: str | Path, out: str | Path, *, iterations: Sequence[int] | None = None,
                       probe: int = 100, probe_seed: int = 0, probe_split: str = "test",
                       kernel: str = "full", backend: str = "auto", dtype: torch.dtype = torch.float32,
                       param_names: Sequence[str] | None = None, compute_dtype: torch.dtype | None = None,
                       store_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       budget_bytes: int = DEFAULT_BUDGET, data_root: str | None = None,
                       cache_dir=None, overwrite: bool = False, quiet: bool = False,
                       ops_backend: str = "auto", dataset: Dataset | None = None,
                       contraction: str = "auto") -> CheckpointKernels:
    """Compute and store the eNTK of each requested checkpoint of ``run_path``.

    The probes are drawn from the run's own data: the dataset and subset it was trained
    on (reloaded from its config, from ``data_root`` if the data moved, or ``dataset``),
    refused unless its fingerprint is the one the run file records.
    ``kernel`` is any of :func:`engine.ntk.entk`'s shapes (``full``, ``traced``, ``diagonal``:
    stored as ``(N·C, C)``, row ``n·C + c``, ``pntk``), of the parameters ``param_names`` (all by
    default), computed in ``compute_dtype`` (``torch.bfloat16`` for the bfloat16 mode).
    ``backend`` picks the Jacobian implementation; ``ops_backend`` the fused Gram tiles and the
    all-pairs kernel inner products (``torch`` | ``triton`` | ``ext`` | ``auto``); ``contraction``
    each layer's strategy (``auto`` | ``materialise`` | ``pairs``, as :func:`engine.ntk.entk`).
    Under torchrun each rank computes its share of the checkpoints (module docstring); every rank
    returns the whole result, ``seconds`` included.
    """
    kernel = parse_enum(KernelKind, kernel, "kernel").value
    with Dist() as d:
        if d.world > 1:
            device = rank_device(device, d)
        return _checkpoint_kernels(d, run_path, out, iterations=iterations, probe=probe, probe_seed=probe_seed,
                                   probe_split=probe_split, kernel=kernel, backend=backend, dtype=dtype,
                                   param_names=param_names, compute_dtype=compute_dtype, store_dtype=store_dtype,
                                   device=device, budget_bytes=budget_bytes, data_root=data_root,
                                   cache_dir=cache_dir, overwrite=overwrite, quiet=quiet, ops_backend=ops_backend,
                                   dataset=dataset, contraction=contraction)


def _checkpoint_kernels(d: Dist, run_path, out, *, iterations, probe, probe_seed, probe_split, kernel, backend,
                        dtype, param_names, compute_dtype, store_dtype, device, budget_bytes, data_root, cache_dir,
                        overwrite, quiet, ops_backend, dataset, contraction) -> CheckpointKernels:
    _check_ops_backend(ops_backend, torch.device(device))  # before any long work
    run = RunFile(run_path)
    cfg = TrainConfig.from_dict(run.config)
    done = run.completed_iterations()
    every_completed = iterations is None
    iterations = list(done if iterations is None else iterations)
    missing = [i for i in iterations if i not in done]
    if missing:
        raise ConfigError(f"checkpoints {missing[:5]} are not completed in {run_path} (completed: {done})")
    if not iterations:
        raise ConfigError(f"{run_path} has no completed checkpoints")
    KernelStore.check_output(out, overwrite=True)  # a directory or a path under a file: before any work
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        if d.main:
            print(f"entk: note: {msg}", file=sys.stderr)

    if every_completed and len(done) < len(run.iterations):
        note(f"{run_path} is incomplete (training was interrupted or is running): only its {len(done)} completed "
             f"checkpoints of {len(run.iterations)} scheduled are used, up to iteration {done[-1]}")
    ds = dataset if dataset is not None else prepare_data(
        dataclasses.replace(cfg, data_root=data_root or cfg.data_root), cache_dir=cache_dir, quiet=quiet)
    data = data_record(ds)
    if run.data is None:
        note(f"{run_path} records no data fingerprint (written by an older entk): "
             f"the probes come from {ds.describe()}, unchecked")
    else:
        bad = data_mismatch(run_path, run.data, data, what="was trained",
                            fix="point --data-root at the data it was trained on")
        if bad:
            raise RunFileError(bad)
    x, _ = probe_set(ds, probe, seed=probe_seed, split=probe_split)
    model = build_model(cfg.model, num_classes=ds.num_classes).to(device).eval()
    x = x.to(device)
    c = num_outputs(model, x)
    if param_names is not None:
        parameter_layout(model, param_names)  # unknown or frozen names: one line, before any work
        param_names = list(param_names)
    size = probe if kernel in ("traced", "pntk") else probe * c
    shape = (probe * c, c) if kernel == "diagonal" else (size, size)
    job = {"run": str(Path(run_path).resolve().name), "model": cfg.model, "probe": probe,
           "probe_seed": probe_seed, "probe_split": probe_split, "probe_hash": probe_hash(x.cpu()),
           "mode": "eval", "kernel": kernel, "num_outputs": c, "accumulate": str(dtype),
           "params": "all" if param_names is None else param_names,
           "compute_dtype": str(compute_dtype or "params")}
    create = {"job": job, "iterations": iterations, "size": size, "dtype": store_dtype, "data": data,
              "shape": shape}
    # Rank 0 lays the file out (or resumes it); the others open it, checking it is their job too.
    store = d.create_then_open(lambda: KernelStore.create_for(out, overwrite=overwrite, **create),
                               lambda: KernelStore.create_for(out, overwrite=False, **create))
    seconds: dict[int, float] = {}
    todo = [(k, it) for k, (it, ok) in enumerate(zip(iterations, store.complete, strict=False))
            if not ok and d.owns(k)]
    desc = f"eNTK {cfg.model} N={probe}" + (f" (rank {d.rank}/{d.world})" if d.world > 1 else "")
    with store.writer() as w:
        with d.together():  # every rank's kernels are on disk
            for k, it in progress_bar(todo, desc=desc, enabled=None if not quiet and d.main else False, unit="ckpt"):
                run.load_into(model, it)
                model.eval()
                t0 = time.perf_counter()
                h = entk(model, x, kernel=kernel, implementation=backend, dtype=dtype, budget_bytes=budget_bytes,
                         param_names=param_names, compute_dtype=compute_dtype, contraction=contraction)
                h = h.reshape(shape)
                seconds[it] = time.perf_counter() - t0
                if not torch.isfinite(h).all():
                    raise ConfigError(f"the eNTK of checkpoint {it} contains NaN/Inf (diverged weights?); "
                                      f"kernels before it are kept in {out}")
                w.write(kernel_name(it), 0, h.to(store_dtype))
                w.mark_complete(k)
        dist = None
        with d.together():
            if d.main:
                prev = store.distances()
                if prev is None:
                    g = kernel_gram(store.kernels(), symmetric=kernel != "diagonal", budget_bytes=budget_bytes,
                                    device=device, backend=ops_backend,
                                    progress=None if not quiet else False)
                    dist = distance_from_gram(g)
                    w.write("kernel_gram", 0, g)
                    w.write("distance", 0, dist)
                    w.mark_complete(len(iterations))
                else:
                    dist = torch.from_numpy(prev[1])
    if not d.main:
        dist = torch.from_numpy(store.distances()[1])
    if d.world > 1:
        merged = {it: s for part in d.all_gather(seconds) for it, s in part.items()}
        seconds = {it: merged[it] for it in iterations if it in merged}
    return CheckpointKernels(store=store, iterations=iterations, distance=dist, seconds=seconds, notes=notes)
