"""The kernel job itself: check the request, load what it computes on, plan, lay the file out, and
write this rank's tiles (see the package docstring)."""

from __future__ import annotations

import copy
import gc
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...data import Dataset, normalize
from ...determinism import set_deterministic
from ...errors import ConfigError, parse_enum
from ...heap import with_freed_memory_reused
from ...ntk import Contraction, num_outputs
from ...ntk.kernel import entk_sample_bytes
from ...progress import progress as progress_bar
from ...store import JacobianStore, KernelTiles, TiledKernel
from ..distributed import Dist, rank_device
from ..job_inputs import check_logits, check_tile
from .blocks import BlockReader, jacobian_phase, prefetch_blocks
from .inputs import from_run, parse_inputs, select, state_hash
from .plan import (
    DEFAULT_PROCESS_MEMORY,
    PROCESS_ALLOWANCE,
    GiB,
    KernelKind,
    Strategy,
    choose_strategy,
    choose_tile_inputs,
    memory_in_use,
    memory_words,
    parse_compute_dtype,
    previous_layout,
    recompute_working,
    tile_bytes,
)
from .tiles import contract, tile


@dataclass
class KernelJobResult:
    path: Path
    kernel: TiledKernel
    strategy: str          # "stored-jacobian" | "recompute"
    reason: str            # the one line saying why
    computed: int          # tiles computed by this process in this call
    n_tiles: int
    seconds: float
    rank: int = 0
    world: int = 1
    memory_in_use: int = 0  # bytes the plan set aside for the process, model and data (memory_in_use())
    # This rank's wall time per phase: "setup" (model, data, file layout), "jacobian" (the stored J
    # blocks; 0 when recomputed), "tiles" (its tiles, up to the final barrier).
    phase_seconds: dict | None = None


@dataclass
class _Request:
    """The arguments of :func:`kernel_job`, parsed and checked before any long work."""
    out: Path
    kind: KernelKind
    cdtype: torch.dtype
    strategy: Strategy
    split1: str
    n1: int
    sx2: tuple[str, int] | None
    contraction: str = "auto"

    @property
    def n2(self) -> int:
        return self.n1 if self.sx2 is None else self.sx2[1]

    @property
    def symmetric(self) -> bool:
        return self.sx2 is None and self.kind is not KernelKind.DIAGONAL


@dataclass
class _Work:
    """What the job computes on: the model on its device, the selected inputs (uint8, with their
    indices and labels), and the job record its file keeps."""
    model: nn.Module
    device: torch.device
    inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (index, uint8 images, labels) per side
    mean: tuple
    std: tuple
    dtype: torch.dtype  # of the model's parameters and the inputs: float64 for a float64 job, else float32
    c: int
    p: int
    job: dict
    in_use: int
    sample_bytes: int = 0  # what each input adds to a recomputed tile's entk call (entk_sample_bytes)

    def batch(self, u8: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return normalize(u8[s:e], self.mean, self.std).to(self.device, self.dtype)

    @property
    def sides(self) -> list[torch.Tensor]:
        return [u8 for _, u8, _ in self.inputs]


def _request(out, run, model, x1, x2, kernel, compute_dtype, memory_bytes, strategy, contraction) -> _Request:
    kind = parse_enum(KernelKind, kernel, "kernel")
    how = parse_enum(Contraction, contraction, "contraction").value
    cdtype = parse_compute_dtype(compute_dtype)
    strategy = parse_enum(Strategy, strategy, "strategy")
    split1, n1 = parse_inputs(x1, "--x1")
    sx2 = None if x2 is None else parse_inputs(x2, "--x2")
    if kind is KernelKind.DIAGONAL and sx2 is not None:
        raise ConfigError("the diagonal kernel has no cross form: drop --x2")
    if memory_bytes <= 0:
        raise ConfigError(f"{memory_words(memory_bytes)} must be > 0")
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory, expected a file path")
    if not os.access(out.parent if out.parent.exists() else Path("."), os.W_OK):
        raise ConfigError(f"--out {out}: the folder is not writable")
    if (run is None) == (model is None):
        raise ConfigError("give either a run file (--run) or a model (--model-fn), not both or neither")
    return _Request(out, kind, cdtype, strategy, split1, n1, sx2, how)


def _load(req: _Request, dev: torch.device, *, run, checkpoint, model, dataset, model_name, seed, data_root,
          cache_dir, quiet) -> _Work:
    if run is not None:
        model, ds, subset, base_seed, info = from_run(run, checkpoint, data_root, cache_dir, quiet)
    else:
        if dataset is None:
            raise ConfigError("a model needs a dataset for its inputs")
        ds, subset, base_seed = dataset, {"train": None, "test": None}, 0
        info = {"run": None, "checkpoint": None, "model": model_name or type(model).__name__, "run_subset": None}
    model = model.to(dev).eval()
    sides = [(req.split1, req.n1, "--x1")] + ([] if req.sx2 is None else [(*req.sx2, "--x2")])
    inputs = [select(ds, split, n, seed, subset[split], base_seed, what) for split, n, what in sides]
    f64 = req.cdtype == torch.float64
    # float64: the job computes on a float64 copy (the caller's model stays as it is); the job record
    # keeps the hash of the state it was given.
    compute_model = copy.deepcopy(model).double() if f64 else model
    work = _Work(compute_model, dev, inputs, ds.mean, ds.std, torch.float64 if f64 else torch.float32, 0, 0, {}, 0)
    if run is None:
        check_logits(compute_model, work.batch(inputs[0][1], 0, 1), info["model"])
    work.c = num_outputs(compute_model, work.batch(inputs[0][1], 0, 1))
    work.p = sum(q.numel() for q in compute_model.parameters() if q.requires_grad)
    work.sample_bytes = entk_sample_bytes(compute_model, work.batch(inputs[0][1], 0, 1), kernel=req.kind)
    sx2 = req.sx2
    work.job = {"format_job": "entk-kernel", **info, "kernel": req.kind.value, "mode": "eval", "num_outputs": work.c,
                "n_params": work.p, "data": ds.name, "data_fingerprint": ds.fingerprint,
                "state_hash": state_hash(model), "x1_split": req.split1, "x1_n": req.n1,
                "x2_split": None if sx2 is None else sx2[0], "x2_n": None if sx2 is None else req.n2, "seed": seed,
                "compute_dtype": str(req.cdtype).removeprefix("torch.")}
    if run is not None:
        del ds  # the inputs are selected; only the job's own images stay in memory
        gc.collect()
    work.in_use = memory_in_use(model, work.sides, dataset) + (memory_in_use(compute_model, []) - PROCESS_ALLOWANCE
                                                                if f64 else 0)
    return work


def _estimate(req: _Request, work: _Work, strat: Strategy) -> dict:
    """The :func:`tile_bytes` arguments of a plan with this strategy (the diagonal kernel is always recomputed)."""
    recomputed = strat is Strategy.RECOMPUTE or req.kind is KernelKind.DIAGONAL
    return {"c": work.c, "p": work.p, "kind": req.kind, "compute_dtype": req.cdtype,
            "sample_bytes": work.sample_bytes if recomputed else None}


def _plan(req: _Request, work: _Work, *, overwrite, memory_bytes, tile_inputs, disk_budget_bytes):
    """The tile size, strategy and the line saying why. Those of an existing file are kept (a resume with
    another memory or disk budget is the same job); otherwise they come from the memory and disk budget.

    The tile size comes from the estimate of the strategy that computes it (:func:`tile_bytes`): stored
    J blocks, or each tile recomputed from the model, which holds no J block but its inputs' block data."""
    prev = previous_layout(req.out, work.job) if not overwrite else None
    n_max = max(req.n1, req.n2)
    if prev is not None:
        t, strat = prev["tile_inputs"], Strategy(prev["strategy"])
        if tile_inputs is None and _tile_budget(req, work, t, strat, memory_bytes) is None:
            need = tile_bytes(t, **_estimate(req, work, strat))
            raise ConfigError(f"{req.out} was started with tiles of {t} inputs, which need {need / GiB:.3g} GiB "
                              f"beside the {work.in_use / GiB:.2f} GiB in use, more than "
                              f"{memory_words(memory_bytes)}; resume with a larger --memory-gb")
        return t, strat, f"resuming {req.out.name}: {prev['strategy']} with tiles of {t} inputs, as it was started"

    def largest(strat: Strategy) -> int:
        return choose_tile_inputs(memory_bytes, n_max=n_max, in_use=work.in_use, **_estimate(req, work, strat))

    def decide(t: int) -> tuple[Strategy, str]:
        return choose_strategy(req.strategy, req.kind, t, req.n1, req.n2, req.symmetric, work.c, work.p, req.out,
                               disk_budget_bytes, itemsize=work.dtype.itemsize)

    first = Strategy.RECOMPUTE if req.strategy is Strategy.RECOMPUTE or req.kind is KernelKind.DIAGONAL \
        else Strategy.STORED
    t = tile_inputs or largest(first)
    strat, reason = decide(t)
    if strat is Strategy.RECOMPUTE and first is Strategy.STORED and tile_inputs is None:
        # auto recomputes on the stored plan's tile (one tile, or J larger than the disk budget): the
        # recomputed tile has its own size, and auto decides again on it (stored when that tile is
        # smaller than the inputs and J fits the disk; it is then within the stored plan's tile too).
        t = largest(Strategy.RECOMPUTE)
        strat, reason = decide(t)
    if tile_inputs is not None:
        need = tile_bytes(min(t, n_max), **_estimate(req, work, strat))
        check_tile(tile_inputs, memory_bytes, work.in_use, need=need, largest=largest(strat))
    return t, strat, reason


def _tile_budget(req: _Request, work: _Work, t: int, strat: Strategy, memory_bytes: int) -> int | None:
    """The working memory of a recomputed tile's ``entk`` call: the block data of all its inputs
    (:func:`recompute_working`); for a resumed file whose tiles are larger than this memory now plans,
    what is left beside the tile (``entk`` then splits the tile into inner blocks). None when not even
    that fits (a stored plan: whether its estimate fits; 0 when it does)."""
    est = _estimate(req, work, strat)
    avail = memory_bytes - work.in_use
    need = tile_bytes(t, **est)
    if est["sample_bytes"] is None:
        return 0 if need <= avail else None
    working = recompute_working(t, kind=req.kind, sample_bytes=work.sample_bytes)
    left = avail - (need - working)
    one = recompute_working(1, kind=KernelKind.DIAGONAL, sample_bytes=work.sample_bytes)  # one input's block
    return min(working, left) if left >= one else None


def _geometry(req: _Request, c: int, t: int) -> dict:
    n1, n2 = req.n1, req.n2
    if req.kind is KernelKind.DIAGONAL:
        return {"matrix_shape": (n1, c * c), "kernel_shape": (n1, c, c), "tile_rows": min(t, n1), "tile_cols": c * c}
    rows_per = 1 if req.kind in (KernelKind.TRACED, KernelKind.PNTK) else c
    return {"matrix_shape": (n1 * rows_per, n2 * rows_per), "kernel_shape": (n1 * rows_per, n2 * rows_per),
            "tile_rows": min(t, n1) * rows_per, "tile_cols": min(t, n2) * rows_per}


def _open_file(d: Dist, req: _Request, work: _Work, geom: dict, overwrite: bool) -> KernelTiles:
    """Rank 0 lays the file out (or resumes it) and records the inputs; every rank then opens it."""
    store_dtype = torch.float64 if req.cdtype == torch.float64 else torch.float32

    def create() -> KernelTiles:
        f = KernelTiles.create_for(req.out, job=work.job, symmetric=req.symmetric, n1=req.n1,
                                   n2=None if req.sx2 is None else req.n2, dtype=store_dtype, overwrite=overwrite,
                                   **geom)
        if not f.inputs_recorded:
            with f.writer() as w:
                f.record_inputs(w, *(a for i, _, y in work.inputs for a in (i, y)))
        return KernelTiles(req.out)

    return d.create_then_open(create, lambda: KernelTiles(req.out))


def _write_tiles(d: Dist, req: _Request, work: _Work, f: KernelTiles, t: int, stores: list[JacobianStore] | None,
                 working_bytes: int, quiet: bool) -> int:
    """This rank's missing tiles into ``f``; returns how many. ``working_bytes``: each tile's working memory."""
    todo = [k for k, done in enumerate(f.complete[: f.n_tiles]) if not done and d.owns(k)]
    grid = f.grid()
    kind, sides, computed = req.kind, work.sides, 0
    # One I/O thread: the last tile is written (and fsynced) while this one multiplies, and on a
    # GPU the next tile's J block is read meanwhile too; waits stay in order, so flags still
    # follow their bytes.
    with f.writer() as w, ThreadPoolExecutor(1, thread_name_prefix="entk-kernel-io") as io:
        reader = None if stores is None else BlockReader(
            stores, [grid[k] for k in todo], req.symmetric, work.device, io,
            prefetch=prefetch_blocks(work.device, stores[0]))
        written = None  # the previous tile's write
        bar = progress_bar(todo, desc=f"eNTK tiles (rank {d.rank}/{d.world})" if d.world > 1
                           else "eNTK tiles", enabled=False if quiet or not d.main else None, unit="tile")
        for n, k in enumerate(bar):
            i, j = grid[k]
            if kind is KernelKind.DIAGONAL:
                h = tile(work.model, work.batch(sides[0], i * t, (i + 1) * t), None, kind, req.cdtype, working_bytes,
                         req.contraction)
            elif reader is not None:
                ja, jb = reader.blocks(n)
                h = contract(ja, jb, kind, work.c, req.cdtype)
                del ja, jb
            else:
                xa = work.batch(sides[0], i * t, (i + 1) * t)
                xb = None if req.symmetric and i == j else work.batch(sides[-1], j * t, (j + 1) * t)
                h = tile(work.model, xa, xb, kind, req.cdtype, working_bytes, req.contraction)
            if not torch.isfinite(h).all():
                raise ConfigError(f"tile ({i}, {j}) of the kernel has NaN/Inf values (diverged weights?); "
                                  f"completed tiles are kept in {req.out}")
            if written is not None:
                written.result()
            written = io.submit(f.write_tile, w, k, h.cpu())
            del h
            computed += 1
        if written is not None:
            written.result()
    return computed


@with_freed_memory_reused
def kernel_job(out: str | Path, *, run: str | Path | None = None, checkpoint: int | None = None,
               model: nn.Module | None = None, dataset: Dataset | None = None, model_name: str | None = None,
               x1: str = "test:100", x2: str | None = None, kernel: str = "full",
               compute_dtype: str | torch.dtype = torch.float32, memory_bytes: int | None = None,
               disk_budget_bytes: int | None = None, tile_inputs: int | None = None,
               strategy: str = "auto", seed: int = 0, device: str | torch.device | None = "cpu",
               data_root: str | None = None, cache_dir=None, overwrite: bool = False, quiet: bool = False,
               deterministic: bool = True, log: Callable[[str], None] | None = print,
               contraction: str = "auto", budget_bytes: int | None = None) -> KernelJobResult:
    """Compute one eNTK into a tiled HDF5 file at ``out`` (see the package docstring and docs/FORMAT.md).

    The model state comes from ``run`` (a run file) at ``checkpoint`` (default: its last completed one),
    with the run's own dataset and data subset; or from ``model`` (any ``nn.Module``, evaluated in eval
    mode) on ``dataset``. ``x1``/``x2`` are ``"SPLIT:N"``: N seeded (``seed``), class-balanced images
    of that split. ``kernel``: ``full`` (N1·C × N2·C), ``traced``, ``pntk`` (N1 × N2) or ``diagonal``
    (N, C, C; no ``x2``). ``memory_bytes`` (default :data:`DEFAULT_PROCESS_MEMORY`, 2 GiB) is the peak
    memory of the whole process, what a scheduler sees (not the working memory that ``budget_bytes``
    means in :mod:`engine.ntk`): :func:`memory_in_use` is set aside and the rest fixes the tile size by
    :func:`tile_bytes` (``tile_inputs`` overrides it). ``budget_bytes`` is its deprecated name (one
    release; it warns). ``strategy`` is
    ``auto`` (store the Jacobian blocks when they fit ``disk_budget_bytes``, default half the free space
    beside ``out``), ``stored-jacobian`` or ``recompute``. A rerun resumes; a file holding another job
    is refused unless ``overwrite``. ``contraction``: each layer's strategy for the float32 and bfloat16
    tiles (``auto`` | ``materialise`` | ``pairs``, as :func:`engine.ntk.entk`).
    ``deterministic`` turns on deterministic algorithms (``engine.set_deterministic``), so that
    tiles computed in different runs or ranks share the bits of an uninterrupted run.
    """
    t_start = time.perf_counter()
    if budget_bytes is not None:
        if memory_bytes is not None:
            raise ConfigError("budget_bytes is the deprecated name of memory_bytes; give one of them")
        warnings.warn("kernel_job(budget_bytes=...) is deprecated; use memory_bytes=... (the same whole-process "
                      "peak memory; budget_bytes= will be removed in the next release)", DeprecationWarning,
                      stacklevel=2)
        memory_bytes = budget_bytes
    if memory_bytes is None:
        memory_bytes = DEFAULT_PROCESS_MEMORY
    req = _request(out, run, model, x1, x2, kernel, compute_dtype, memory_bytes, strategy, contraction)
    say = log if log is not None else (lambda s: None)
    if deterministic:
        set_deterministic(True)  # resumed and sharded tiles must have the bits of an uninterrupted run
    with Dist() as d:
        work = _load(req, rank_device(device, d), run=run, checkpoint=checkpoint, model=model, dataset=dataset,
                     model_name=model_name, seed=seed, data_root=data_root, cache_dir=cache_dir, quiet=quiet)
        t, strat, reason = _plan(req, work, overwrite=overwrite, memory_bytes=memory_bytes, tile_inputs=tile_inputs,
                                 disk_budget_bytes=disk_budget_bytes)
        work.job["tile_inputs"], work.job["strategy"] = int(t), strat.value
        geom = _geometry(req, work.c, t)
        f = _open_file(d, req, work, geom, overwrite)
        # Rank 0's decision, as recorded (another rank could see another free disk space).
        t, strat = int(f.job["tile_inputs"]), Strategy(f.job["strategy"])
        if d.main:
            form = ("symmetric, upper tiles only" if req.symmetric else
                    "per-sample blocks" if req.kind is KernelKind.DIAGONAL else "cross")
            est = tile_bytes(min(t, max(req.n1, req.n2)), **_estimate(req, work, strat))
            say(f"entk kernel: {req.kind.value} kernel {'x'.join(map(str, geom['kernel_shape']))} ({form}), "
                f"{f.n_tiles} tiles of {t} inputs per side ({est / GiB:.2f} GiB est. peak "
                f"per tile pair), {d.world} rank(s)")
            say(f"J blocks: {reason}")

        # A recomputed tile's entk call gets the working memory its estimate set aside (the block data
        # of all the tile's inputs in one block: no inner block recomputed), not the whole process
        # memory, so that the process stays within memory_bytes. Stored tiles call no entk.
        working = 0
        if strat is Strategy.RECOMPUTE or req.kind is KernelKind.DIAGONAL:
            t_in = min(t, max(req.n1, req.n2))
            working = _tile_budget(req, work, t_in, strat, memory_bytes) or \
                recompute_working(t_in, kind=req.kind, sample_bytes=work.sample_bytes)  # a --tile kept on resume
        stores = None
        t_jac = time.perf_counter()
        if strat is Strategy.STORED and req.kind is not KernelKind.DIAGONAL:
            stores = jacobian_phase(req.out, work.job, work.sides, work.batch, work.model, req.kind, work.c, work.p,
                                    t, d, quiet, overwrite, dtype=work.dtype)
        t_tiles = time.perf_counter()
        computed = 0
        with d.together():
            computed = _write_tiles(d, req, work, f, t, stores, working, quiet)
        t_end = time.perf_counter()
        if d.main and stores is not None and f.complete.all():
            for s in stores:
                s.path.unlink(missing_ok=True)  # every tile is on disk: the Jacobian blocks served their purpose
        d.agree()
        return KernelJobResult(path=req.out, kernel=TiledKernel(req.out), strategy=strat.value, reason=reason,
                               computed=computed, n_tiles=f.n_tiles, seconds=time.perf_counter() - t_start,
                               rank=d.rank, world=d.world, memory_in_use=work.in_use,
                               phase_seconds={"setup": t_jac - t_start, "jacobian": t_tiles - t_jac,
                                              "tiles": t_end - t_tiles})
