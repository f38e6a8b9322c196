"""``entk kernel``: one eNTK larger than memory, tile by tile, resumable, sharded over torch.distributed ranks.

The kernel of inputs x1 (and x2 for a cross-kernel) is cut into tiles of ``t`` inputs per side,
``t`` chosen from the memory budget; each tile is computed, written into a
:class:`~engine.store.KernelTiles` file and flagged complete, so the job never holds H and
resumes at tile granularity after any crash. The Jacobian blocks either go to a resumable
Jacobian store beside the output (each computed once, when they fit the disk budget) or are
recomputed for every tile pair.

Under ``torchrun`` (``WORLD_SIZE > 1``) rank r takes the tiles k with ``k % world == r``, on
``cuda:LOCAL_RANK`` or the CPU. Files are written without parallel HDF5: rank 0 creates every
file with its whole layout fixed (``engine.h5raw``); afterwards each rank only ``pwrite``\\ s raw
bytes at the fixed offsets of its own tiles and completion flags, so ranks never write the same
byte and no HDF5 metadata changes. The collectives are barriers and short status messages
over gloo (also on GPUs). Every tile is a pure function of its inputs, so the file is
bit-identical for any number of ranks, and a rerun after any rank died resumes.
"""

from __future__ import annotations

import enum
import gc
import hashlib
import importlib
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import Dataset, load_dataset, normalize
from ..determinism import set_deterministic
from ..errors import ConfigError, parse_enum
from ..models import build_model
from ..ntk import Contraction, entk, jacobian, num_outputs
from ..progress import progress as progress_bar
from ..store import JacobianStore, KernelTiles, RunFile, StoreError, TiledKernel
from ..train import TrainConfig
from .distributed import Dist, rank_device

GiB = 2**30
DEFAULT_BUDGET = 2 * GiB
# Working memory of one Jacobian call beyond its output: engine.ntk.jacobian keeps a block's
# output gradients, patches and graph under ~256 MiB; small blocks need proportionally less.
_JAC_WORKSPACE = 256 << 20
_BASE_OVERHEAD = 64 << 20  # transient copies (a batch, the padded tile write), allocator slack
# The interpreter, torch, its libraries and allocator retention: ~1 GiB resident on a CPU build (measured,
# benchmarks/results/README.md). A constant, not a
# measurement, so that the tile size (and with it the file) is the same in every process and launch.
PROCESS_ALLOWANCE = 1 << 30


def resident_bytes() -> int:
    """This process's resident memory now (for reports and tests; the plan uses :func:`memory_in_use`)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class KernelKind(str, enum.Enum):  # noqa: UP042 - same str-mixin form as the other engine enums
    FULL = "full"          # (N1·C, N2·C), row n·C + c
    TRACED = "traced"      # (N1, N2), summed over the C outputs
    DIAGONAL = "diagonal"  # (N, C, C): per-sample output blocks
    PNTK = "pntk"          # (N1, N2): kernel of Σ_c f_c / √C


_COMPUTE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_compute_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in _COMPUTE.values():
            return value
        value = str(value)
    key = str(value).removeprefix("torch.")
    if key not in _COMPUTE:
        raise ConfigError(f"compute dtype must be one of {', '.join(_COMPUTE)}, got {value!r}")
    return _COMPUTE[key]


def parse_inputs(spec: str, what: str = "--x1") -> tuple[str, int]:
    """``"train:5000"`` → ``("train", 5000)``."""
    split, _, n = str(spec).partition(":")
    if split not in ("train", "test") or not n.strip().isdigit() or int(n) < 1:
        raise ConfigError(f"{what} must be SPLIT:N with SPLIT train or test and N >= 1 (e.g. train:5000), "
                          f"got {spec!r}")
    return split, int(n)


def balanced_indices(y: torch.Tensor, n: int | None, seed: int, num_classes: int) -> torch.Tensor:
    """Indices of the seeded class-balanced subset ``Dataset.subset`` picks (ascending)."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    ys = y[perm]
    onehot = torch.nn.functional.one_hot(ys, num_classes)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    order = torch.argsort(rank * num_classes + ys, stable=True)[:n]
    return perm[order].sort().values


# --------------------------------------------------------------------------- one tile


def _jacobian_block(model: nn.Module, x: torch.Tensor, kind: KernelKind, c: int) -> torch.Tensor:
    """J of one block: ``(n·C, P)``, or ``(n, P)`` for the pNTK output Σ_c f_c / √C."""
    if kind is KernelKind.PNTK:
        v = torch.full((c,), 1.0 / math.sqrt(c), dtype=x.dtype, device=x.device)
        return jacobian(model, x, projection=v)
    return jacobian(model, x)


def _contract(ja: torch.Tensor, jb: torch.Tensor | None, kind: KernelKind, c: int,
              compute_dtype: torch.dtype) -> torch.Tensor:
    """The tile from two Jacobian blocks (``jb=None``: a diagonal tile, J_a J_aᵀ)."""
    same = jb is None
    out_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    a = ja.to(compute_dtype)
    b = a if same else jb.to(compute_dtype)
    if kind is KernelKind.DIAGONAL:
        a3 = a.view(-1, c, a.shape[1])
        return torch.bmm(a3, a3.transpose(1, 2)).to(out_dtype).reshape(a3.shape[0], c * c)
    if kind is KernelKind.TRACED:
        a3 = a.view(-1, c, a.shape[1]).transpose(0, 1)
        b3 = b.view(-1, c, b.shape[1]).transpose(0, 1)
        h = torch.bmm(a3, b3.transpose(1, 2)).to(out_dtype).sum(0)
    else:
        h = torch.mm(a, b.T).to(out_dtype)
    if same:  # the diagonal tile of a symmetric kernel: exactly symmetric, from its upper triangle
        h = torch.triu(h) + torch.triu(h, 1).T
    return h


def _tile(model: nn.Module, xa: torch.Tensor, xb: torch.Tensor | None, kind: KernelKind,
          compute_dtype: torch.dtype, budget_bytes: int, contraction: str = "auto") -> torch.Tensor:
    """One tile of the kernel, straight from the model: ``(na·C, nb·C)``, ``(na, nb)`` or ``(na, C·C)``.

    ``xb=None`` is a diagonal tile of a symmetric kernel (and the only form of the diagonal kernel).

    float32 and bfloat16 tiles come from the one-pass engine (:func:`engine.ntk.entk`, a cross-kernel
    for ``xb``); float64 from float64 Jacobian blocks (the one-pass engine computes in the
    parameters' dtype). Nothing else in this module computes a tile from the model.
    """
    if compute_dtype == torch.float64:
        c = num_outputs(model, xa)
        ja = _jacobian_block(model, xa, kind, c)
        jb = None if xb is None else _jacobian_block(model, xb, kind, c)
        return _contract(ja, jb, kind, c, compute_dtype)
    h = entk(model, xa, xb, kernel=kind.value, compute_dtype=compute_dtype, budget_bytes=budget_bytes,
             dtype=torch.float32, contraction=contraction)
    if kind is KernelKind.DIAGONAL:
        return h.reshape(len(xa), -1)
    if xb is None:  # the diagonal tile of a symmetric kernel: exactly symmetric, from its upper triangle
        h = torch.triu(h) + torch.triu(h, 1).T
    return h


# --------------------------------------------------------------------------- planning


def tile_bytes(t: int, *, c: int, p: int, kind: KernelKind, compute_dtype: torch.dtype) -> int:
    """Estimated peak bytes of one tile pair of ``t`` inputs per side (two J blocks, casts, the tile)."""
    rows = t if kind is KernelKind.PNTK else t * c
    cast = {torch.float32: 0, torch.bfloat16: 2, torch.float64: 8}[compute_dtype]
    jblocks = 2 * rows * p * (4 + cast)
    out = 8 if compute_dtype == torch.float64 else 4
    if kind is KernelKind.FULL:
        tile = rows * rows * out * 4                 # product, symmetrised copy, the last tile and its padded copy
    elif kind is KernelKind.TRACED:
        tile = c * t * t * out + 4 * t * t * out     # the C per-output products, then their sum
    elif kind is KernelKind.DIAGONAL:
        tile = 4 * t * c * c * out
    else:
        tile = 4 * t * t * out
    return jblocks + tile + min(_JAC_WORKSPACE, jblocks) + _BASE_OVERHEAD


def choose_tile_inputs(budget_bytes: int, *, n_max: int, in_use: int = 0, **kw) -> int:
    """The largest tile (inputs per side, at most ``n_max``) whose estimate fits ``budget_bytes - in_use``."""
    need = tile_bytes(1, **kw)
    avail = budget_bytes - in_use
    if need > avail:
        used = f" beside the {in_use / GiB:.2f} GiB this process already holds (torch, model, data)" if in_use else ""
        raise ConfigError(f"--budget-gb {budget_bytes / GiB:.3g} is too small: a tile of one input needs "
                          f"{need / GiB:.3g} GiB (two Jacobian rows of {kw['p']:,} parameters and the Jacobian "
                          f"workspace){used}; raise the budget")
    lo, hi = 1, max(1, n_max)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tile_bytes(mid, **kw) <= avail:
            lo = mid
        else:
            hi = mid - 1
    return lo


def memory_in_use(model: nn.Module, inputs: list[torch.Tensor], dataset: Dataset | None = None) -> int:
    """What the budget holds besides the tiles: :data:`PROCESS_ALLOWANCE`, the model (twice: parameters
    and their gradients' buffers), the selected images, and a caller's dataset. Deterministic."""
    sd = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    data = 0 if dataset is None else sum(t.numel() * t.element_size() for t in
                                         (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test))
    return PROCESS_ALLOWANCE + 2 * sd + sum(u.numel() * u.element_size() for u in inputs) + data


# --------------------------------------------------------------------------- the job


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


def _state_hash(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=12)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return "b2:" + h.hexdigest()


def load_model_fn(spec: str, state: str | Path | None = None) -> nn.Module:
    """``package.module:factory`` → ``factory()`` (an ``nn.Module``), with a state dict from ``state``."""
    mod, _, attr = str(spec).partition(":")
    if not mod or not attr:
        raise ConfigError(f"--model-fn must be package.module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--model-fn {spec}: cannot import it ({e})") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model-fn {spec} returned {type(model).__name__}, expected a torch.nn.Module")
    if state is not None:
        if not Path(state).exists():
            raise ConfigError(f"--state {state} does not exist")
        sd = torch.load(state, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"--state {state} does not fit --model-fn {spec}: "
                              f"{str(e).strip().splitlines()[0]}") from None
    return model


def _from_run(run_path, checkpoint, data_root, cache_dir, quiet):
    run = RunFile(run_path)
    cfg = TrainConfig.from_dict(run.config)
    done = run.completed_iterations()
    if not done:
        raise ConfigError(f"{run_path} has no completed checkpoints")
    it = done[-1] if checkpoint is None else int(checkpoint)
    if it not in done:
        raise ConfigError(f"checkpoint {it} is not completed in {run_path} (completed: {done})")
    root = data_root or cfg.data_root
    kwargs = {"cache_dir": cache_dir, "progress": False if quiet else None} if cfg.data == "cifar10" else {}
    ds = load_dataset(cfg.data, root, **kwargs)
    model = build_model(cfg.model, num_classes=ds.num_classes)
    run.load_into(model, it)
    subset = {"train": cfg.n_train, "test": cfg.n_test}
    info = {"run": Path(run_path).name, "checkpoint": it, "model": cfg.model,
            "run_subset": [cfg.n_train, cfg.n_test, cfg.subset_seed]}
    return model, ds, subset, cfg.subset_seed, info


def _select(ds: Dataset, split: str, n: int, seed: int, base_n: int | None, base_seed: int, what: str):
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    base = balanced_indices(y, base_n, base_seed, ds.num_classes)
    if n > len(base):
        raise ConfigError(f"{what} {split}:{n} asks for more than the {len(base)} {split} images available")
    idx = base[balanced_indices(y[base], n, seed, ds.num_classes)]
    return idx, x[idx].contiguous(), y[idx].contiguous()


def kernel_job(out: str | Path, *, run: str | Path | None = None, checkpoint: int | None = None,
               model: nn.Module | None = None, dataset: Dataset | None = None, model_name: str | None = None,
               x1: str = "test:100", x2: str | None = None, kernel: str = "full",
               compute_dtype: str | torch.dtype = torch.float32, budget_bytes: int = DEFAULT_BUDGET,
               disk_budget_bytes: int | None = None, tile_inputs: int | None = None,
               strategy: str = "auto", seed: int = 0, device: str | torch.device | None = "cpu",
               data_root: str | None = None, cache_dir=None, overwrite: bool = False, quiet: bool = False,
               deterministic: bool = True, log: Callable[[str], None] | None = print,
               contraction: str = "auto") -> KernelJobResult:
    """Compute one eNTK into a tiled HDF5 file at ``out`` (see the module docstring and docs/FORMAT.md).

    The model state comes from ``run`` (a run file) at ``checkpoint`` (default: its last completed one),
    with the run's own dataset and data subset; or from ``model`` (any ``nn.Module``, evaluated in eval
    mode) on ``dataset``. ``x1``/``x2`` are ``"SPLIT:N"``: N seeded (``seed``), class-balanced images
    of that split. ``kernel``: ``full`` (N1·C × N2·C), ``traced``, ``pntk`` (N1 × N2) or ``diagonal``
    (N, C, C; no ``x2``). ``budget_bytes`` is the process's memory: :func:`memory_in_use` is set aside and
    the rest fixes the tile size by :func:`tile_bytes` (``tile_inputs`` overrides it). ``strategy`` is
    ``auto`` (store the Jacobian blocks when they fit ``disk_budget_bytes``, default half the free space
    beside ``out``), ``stored-jacobian`` or ``recompute``. A rerun resumes; a file holding another job
    is refused unless ``overwrite``. ``contraction``: each layer's strategy for the float32 and bfloat16
    tiles (``auto`` | ``materialise`` | ``pairs``, as :func:`engine.ntk.entk`).
    ``deterministic`` turns on deterministic algorithms (``engine.set_deterministic``), so that
    tiles computed in different runs or ranks share the bits of an uninterrupted run.
    """
    t_start = time.perf_counter()
    kind = parse_enum(KernelKind, kernel, "kernel")
    cdtype = parse_compute_dtype(compute_dtype)
    strategy = parse_enum(_Strategy, strategy, "strategy")
    how = parse_enum(Contraction, contraction, "contraction").value
    split1, n1 = parse_inputs(x1, "--x1")
    sx2 = None if x2 is None else parse_inputs(x2, "--x2")
    if kind is KernelKind.DIAGONAL and sx2 is not None:
        raise ConfigError("the diagonal kernel has no cross form: drop --x2")
    if budget_bytes <= 0:
        raise ConfigError(f"--budget-gb must be > 0, got {budget_bytes / GiB:.3g}")
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory, expected a file path")
    if not os.access(out.parent if out.parent.exists() else Path("."), os.W_OK):
        raise ConfigError(f"--out {out}: the folder is not writable")
    if (run is None) == (model is None):
        raise ConfigError("give either a run file (--run) or a model (--model-fn), not both or neither")
    say = log if log is not None else (lambda s: None)

    if deterministic:
        set_deterministic(True)  # resumed and sharded tiles must have the bits of an uninterrupted run
    d = Dist()
    try:
        dev = rank_device(device, d)
        if run is not None:
            model, ds, subset, base_seed, info = _from_run(run, checkpoint, data_root, cache_dir, quiet)
        else:
            if dataset is None:
                raise ConfigError("a model needs a dataset for its inputs")
            ds, subset, base_seed = dataset, {"train": None, "test": None}, 0
            info = {"run": None, "checkpoint": None, "model": model_name or type(model).__name__,
                    "run_subset": None}
        model = model.to(dev).eval()
        i1, u1, y1 = _select(ds, split1, n1, seed, subset[split1], base_seed, "--x1")
        if sx2 is not None:
            i2, u2, y2 = _select(ds, sx2[0], sx2[1], seed, subset[sx2[0]], base_seed, "--x2")
        symmetric = sx2 is None and kind is not KernelKind.DIAGONAL

        mean, std = ds.mean, ds.std

        def batch(u8: torch.Tensor, s: int, e: int) -> torch.Tensor:
            return normalize(u8[s:e], mean, std).to(dev)

        c = num_outputs(model, batch(u1, 0, 1))
        p = sum(q.numel() for q in model.parameters() if q.requires_grad)
        n2 = n1 if sx2 is None else sx2[1]
        job = {"format_job": "entk-kernel", **info, "kernel": kind.value, "mode": "eval", "num_outputs": c,
               "n_params": p, "data": ds.name, "data_fingerprint": ds.fingerprint, "state_hash": _state_hash(model),
               "x1_split": split1, "x1_n": n1, "x2_split": None if sx2 is None else sx2[0],
               "x2_n": None if sx2 is None else n2, "seed": seed, "compute_dtype": str(cdtype).removeprefix("torch.")}

        if run is not None:
            del ds  # the inputs are selected; only the job's own images stay in memory
            gc.collect()
        in_use = memory_in_use(model, [u1] if sx2 is None else [u1, u2], dataset)

        # The tile size and strategy of an existing file are kept (a resume with another budget or
        # disk is the same job); otherwise they come from the budgets.
        prev = _previous_layout(out, job) if not overwrite else None
        plan_kw = {"c": c, "p": p, "kind": kind, "compute_dtype": cdtype}
        if prev is not None:
            t, strat = prev["tile_inputs"], _Strategy(prev["strategy"])
            need = tile_bytes(t, **plan_kw)
            if need > budget_bytes - in_use and tile_inputs is None:
                raise ConfigError(f"{out} was started with tiles of {t} inputs, which need {need / GiB:.3g} GiB "
                                  f"beside the {in_use / GiB:.2f} GiB in use, more than --budget-gb "
                                  f"{budget_bytes / GiB:.3g}; resume with a larger budget")
            reason = f"resuming {out.name}: {prev['strategy']} with tiles of {t} inputs, as it was started"
        else:
            t = tile_inputs or choose_tile_inputs(budget_bytes, n_max=max(n1, n2), in_use=in_use, **plan_kw)
            strat, reason = _choose_strategy(strategy, kind, t, n1, n2, symmetric, c, p, out, disk_budget_bytes)
        job["tile_inputs"], job["strategy"] = int(t), strat.value

        rows_per = 1 if kind in (KernelKind.TRACED, KernelKind.PNTK, KernelKind.DIAGONAL) else c
        t1, t2 = min(t, n1), min(t, n2)
        if kind is KernelKind.DIAGONAL:
            geom = {"matrix_shape": (n1, c * c), "kernel_shape": (n1, c, c), "tile_rows": t1, "tile_cols": c * c}
        else:
            geom = {"matrix_shape": (n1 * rows_per, n2 * rows_per),
                    "kernel_shape": (n1 * rows_per, n2 * rows_per), "tile_rows": t1 * rows_per,
                    "tile_cols": t2 * rows_per}
        store_dtype = torch.float64 if cdtype == torch.float64 else torch.float32

        err = None
        if d.main:
            try:
                f = KernelTiles.create_for(out, job=job, symmetric=symmetric, n1=n1,
                                           n2=None if sx2 is None else n2, dtype=store_dtype,
                                           overwrite=overwrite, **geom)
                if not f.inputs_recorded:
                    with f.writer() as w:
                        f.record_inputs(w, i1, y1, *(() if sx2 is None else (i2, y2)))
            except Exception as e:
                err = e
        d.agree(err)
        f = KernelTiles(out)
        # Rank 0's decision, as recorded (another rank could see another free disk space).
        t, strat = int(f.job["tile_inputs"]), _Strategy(f.job["strategy"])
        if d.main:
            form = ("symmetric, upper tiles only" if symmetric else
                    "per-sample blocks" if kind is KernelKind.DIAGONAL else "cross")
            say(f"entk kernel: {kind.value} kernel {'x'.join(map(str, geom['kernel_shape']))} ({form}), "
                f"{f.n_tiles} tiles of {t} inputs per side ({tile_bytes(t, **plan_kw) / GiB:.2f} GiB est. peak "
                f"per tile pair), {d.world} rank(s)")
            say(f"J blocks: {reason}")

        sides = [u1] if sx2 is None else [u1, u2]
        stores = None
        t_jac = time.perf_counter()
        if strat is _Strategy.STORED and kind is not KernelKind.DIAGONAL:
            stores = _jacobian_phase(out, job, sides, batch, model, kind, c, p, t, d, quiet, overwrite)
        t_tiles = time.perf_counter()

        todo = [k for k, done in enumerate(f.complete[: f.n_tiles]) if not done and k % d.world == d.rank]
        grid = f.grid()
        computed = 0
        err = None
        try:
            # One I/O thread: the last tile is written (and fsynced) while this one multiplies, and on a
            # GPU the next tile's J block is read meanwhile too; waits stay in order, so flags still
            # follow their bytes.
            with f.writer() as w, ThreadPoolExecutor(1, thread_name_prefix="entk-kernel-io") as io:
                reader = None if stores is None else _BlockReader(
                    stores, [grid[k] for k in todo], symmetric, dev, io,
                    prefetch=_prefetch_blocks(dev, stores[0]))
                written = None  # the previous tile's write
                bar = progress_bar(todo, desc=f"eNTK tiles (rank {d.rank}/{d.world})" if d.world > 1
                                   else "eNTK tiles", enabled=False if quiet or not d.main else None, unit="tile")
                for n, k in enumerate(bar):
                    i, j = grid[k]
                    if kind is KernelKind.DIAGONAL:
                        h = _tile(model, batch(u1, i * t, (i + 1) * t), None, kind, cdtype, budget_bytes, how)
                    elif reader is not None:
                        ja, jb = reader.blocks(n)
                        h = _contract(ja, jb, kind, c, cdtype)
                        del ja, jb
                    else:
                        xa = batch(u1, i * t, (i + 1) * t)
                        xb = None if symmetric and i == j else batch(sides[-1], j * t, (j + 1) * t)
                        h = _tile(model, xa, xb, kind, cdtype, budget_bytes, how)
                    if not torch.isfinite(h).all():
                        raise ConfigError(f"tile ({i}, {j}) of the kernel has NaN/Inf values (diverged weights?); "
                                          f"completed tiles are kept in {out}")
                    if written is not None:
                        written.result()
                    written = io.submit(f.write_tile, w, k, h.cpu())
                    del h
                    computed += 1
                if written is not None:
                    written.result()
        except (Exception, KeyboardInterrupt) as e:
            if d.world == 1 or isinstance(e, KeyboardInterrupt):
                raise
            err = e
        t_end = time.perf_counter()
        d.agree(err)
        if d.main and stores is not None and f.complete.all():
            for s in stores:
                s.path.unlink(missing_ok=True)  # every tile is on disk: the Jacobian blocks served their purpose
        d.agree()
        return KernelJobResult(path=out, kernel=TiledKernel(out), strategy=strat.value, reason=reason,
                               computed=computed, n_tiles=f.n_tiles, seconds=time.perf_counter() - t_start,
                               rank=d.rank, world=d.world, memory_in_use=in_use,
                               phase_seconds={"setup": t_jac - t_start, "jacobian": t_tiles - t_jac,
                                              "tiles": t_end - t_tiles})
    finally:
        d.close()


class _Strategy(str, enum.Enum):  # noqa: UP042
    AUTO = "auto"
    STORED = "stored-jacobian"
    RECOMPUTE = "recompute"


def _previous_layout(out: Path, job: dict) -> dict | None:
    """The job of an existing file holding this job (its tile size and strategy are kept), else None.

    A file of this format holding another job is refused here, naming the fields that differ.
    """
    if not out.exists():
        return None
    try:
        prev = KernelTiles(out).job
    except StoreError:
        return None  # not a kernel file: create_for refuses it with its own message
    diff = sorted(k for k, v in _jsonable(job).items() if prev.get(k) != v)
    if diff:
        raise StoreError(f"{out} holds a different job (differs in {', '.join(diff)}); "
                         f"pass overwrite (--overwrite) or choose another output")
    return prev


def _jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d, default=str))


def _choose_strategy(strategy, kind, t, n1, n2, symmetric, c, p, out, disk_budget):
    """Store J blocks (each computed once) or recompute them per tile pair; returns (choice, one-line reason)."""
    b1, b2 = -(-n1 // t), -(-n2 // t)
    if kind is KernelKind.DIAGONAL:
        return _Strategy.RECOMPUTE, "recomputed: the diagonal kernel uses each input block once, nothing to reuse"
    rows = 1 if kind is KernelKind.PNTK else c
    jbytes = (n1 if symmetric else n1 + n2) * rows * p * 4
    evals_recompute = b1 * b1 if symmetric else 2 * b1 * b2
    evals_stored = b1 if symmetric else b1 + b2
    if disk_budget is None:
        disk_budget = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free // 2
    cost = f"{evals_stored} block Jacobians instead of {evals_recompute}"
    if strategy is _Strategy.STORED:
        return _Strategy.STORED, f"stored (--strategy stored-jacobian; {jbytes / GiB:.3g} GiB on disk): {cost}"
    if strategy is _Strategy.RECOMPUTE:
        return _Strategy.RECOMPUTE, f"recomputed per tile pair (--strategy recompute): {evals_recompute} blocks"
    if evals_recompute == evals_stored:
        return _Strategy.RECOMPUTE, "recomputed: one tile, each block's Jacobian is used once"
    if jbytes <= disk_budget:
        return _Strategy.STORED, (f"stored beside the output ({jbytes / GiB:.3g} GiB <= disk budget "
                                  f"{disk_budget / GiB:.3g} GiB): {cost}")
    return _Strategy.RECOMPUTE, (f"recomputed per tile pair ({evals_recompute} block Jacobians): storing J needs "
                                 f"{jbytes / GiB:.3g} GiB > disk budget {disk_budget / GiB:.3g} GiB")


def _block_bytes(store: JacobianStore) -> int:
    shape, dtype, _, _ = store.datasets["jacobian"]
    return store.block_inputs * store.num_outputs * shape[1] * dtype.itemsize


def _prefetch_blocks(device: torch.device, store: JacobianStore) -> bool:
    """Read the next J block in the background: on a GPU, whose host idles while the tile multiplies,
    and only when a third block fits in the Jacobian workspace :func:`tile_bytes` sets aside (one block
    at most: min(workspace, two blocks) holds one block exactly when it is at most the workspace).
    Not on the CPU, where the reading thread takes cycles from the BLAS threads (measured slower on
    2 cores, benchmarks/results/README.md)."""
    b = _block_bytes(store)
    return device.type == "cuda" and b <= _JAC_WORKSPACE


class _BlockReader:
    """The two J blocks of each tile of the loop (row block, column block; None on a symmetric
    diagonal tile), read into reused buffers (fresh pages fault in slowly on some machines).

    With ``prefetch``, the next tile's first new block is read on ``io`` while this tile
    multiplies: three buffers (row, column, the one being read), else two. ``tiles`` are the
    (i, j) of the loop in order; a block held as the column is reused as the next row.
    """

    def __init__(self, stores: list[JacobianStore], tiles: list[tuple[int, int]], symmetric: bool,
                 device: torch.device, io: ThreadPoolExecutor, *, prefetch: bool):
        self.stores, self.tiles, self.symmetric, self.device, self.io = stores, tiles, symmetric, device, io
        self.bufs: list[np.ndarray | None] = [None] * (3 if prefetch else 2)
        self.prefetch = prefetch
        self.row = self.col = None  # (key, buffer index, tensor); key = (side, block)
        self.pending = None         # (key, buffer index, future)

    def _keys(self, n: int):
        i, j = self.tiles[n]
        return (0, i), (None if self.symmetric and i == j else (len(self.stores) - 1, j))

    def _read(self, key, b: int) -> torch.Tensor:
        store = self.stores[key[0]]
        if self.bufs[b] is None:
            self.bufs[b] = np.empty(_block_bytes(store) // store.datasets["jacobian"][1].itemsize,
                                    store.datasets["jacobian"][1])
        return _read_block(store, key[1], self.bufs[b]).to(self.device)

    def _obtain(self, key, keep: set[int]):
        if self.pending is not None:
            pkey, pb, fut = self.pending
            self.pending = None
            block = fut.result()  # finished before its buffer can be reused
            if pkey == key:
                return pb, block
        b = next(b for b in range(len(self.bufs)) if b not in keep)
        return b, self._read(key, b)

    def blocks(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        rk, ck = self._keys(n)
        if self.row is None or self.row[0] != rk:
            if self.col is not None and self.col[0] == rk:
                self.row = self.col  # the last column block is the next row's block
            else:
                keep = {self.col[1]} if self.col is not None and self.col[0] == ck else set()
                self.row = (rk, *self._obtain(rk, keep))
        if ck is None:
            self.col = None
        elif self.col is None or self.col[0] != ck:
            self.col = (ck, *self._obtain(ck, {self.row[1]}))
        if self.prefetch and n + 1 < len(self.tiles) and self.pending is None:
            held = {x[0]: x[1] for x in (self.row, self.col) if x is not None}
            new = [key for key in self._keys(n + 1) if key is not None and key not in held]
            if new:
                b = next(b for b in range(len(self.bufs)) if b not in held.values())
                self.pending = (new[0], b, self.io.submit(self._read, new[0], b))
        return self.row[2], None if self.col is None else self.col[2]


def _read_block(store: JacobianStore, u: int, buf: np.ndarray | None = None) -> torch.Tensor:
    """J block ``u`` of a Jacobian store, read with one positioned read (no memory map, whose
    touched pages would count against the budget for as long as it is open), into ``buf``
    (flat, large enough) when given."""
    s, e = store.unit_inputs(u)
    k = store.num_outputs
    shape, dtype, off, _ = store.datasets["jacobian"]
    rows = (e - s) * k
    out = np.empty((rows, shape[1]), dtype) if buf is None else buf[: rows * shape[1]].reshape(rows, shape[1])
    with open(store.path, "rb", buffering=0) as fh:
        fh.seek(off + s * k * shape[1] * dtype.itemsize)
        view, got = memoryview(out).cast("B"), 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise StoreError(f"{store.path} is truncated at J block {u}")
            got += n
    return torch.from_numpy(out)


def _jacobian_phase(out, job, sides, batch, model, kind, c, p, t, d, quiet, overwrite) -> list[JacobianStore]:
    """Every J block of every side into a resumable store beside ``out`` (blocks sharded over ranks)."""
    k = 1 if kind is KernelKind.PNTK else c
    paths = [out.with_name(f"{out.name}.jacobian{s + 1}.h5") for s in range(len(sides))]
    spec = {"kernel_file": out.name, **{key: job[key] for key in ("state_hash", "data_fingerprint", "kernel", "seed",
                                                                   "x1_split", "x1_n", "x2_split", "x2_n")}}
    err = None
    if d.main:
        try:
            for s, (u8, path) in enumerate(zip(sides, paths, strict=True)):
                JacobianStore.create_for(path, job={**spec, "side": s + 1}, n_inputs=len(u8), num_outputs=k,
                                         n_params=p, block_inputs=t, overwrite=overwrite)
        except Exception as e:
            err = e
    d.agree(err)
    stores = [JacobianStore(path) for path in paths]
    err = None
    try:
        for s, (u8, store) in enumerate(zip(sides, stores, strict=True)):
            todo = [u for u, done in enumerate(store.complete) if not done and u % d.world == d.rank]
            with store.writer() as w:
                for u in progress_bar(todo, desc=f"J blocks x{s + 1}", enabled=False if quiet or not d.main else None,
                                      unit="block"):
                    a, b = store.unit_inputs(u)
                    jb = _jacobian_block(model, batch(u8, a, b), kind, c)
                    w.write("jacobian", a * k, jb)
                    w.mark_complete(u)
    except (Exception, KeyboardInterrupt) as e:
        if d.world == 1 or isinstance(e, KeyboardInterrupt):
            raise
        err = e
    d.agree(err)
    return stores


__all__ = ["KernelJobResult", "KernelKind", "balanced_indices", "choose_tile_inputs", "kernel_job", "load_model_fn",
           "parse_inputs", "tile_bytes"]
