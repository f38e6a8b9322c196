"""Stored Jacobian blocks of a kernel job: written once into resumable stores beside the output
(sharded over ranks), then read back tile by tile into reused buffers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ...progress import progress as progress_bar
from ...store import JacobianStore, StoreError
from ..distributed import Dist
from .plan import JAC_WORKSPACE, KernelKind
from .tiles import jacobian_block


def block_bytes(store: JacobianStore) -> int:
    shape, dtype, _, _ = store.datasets["jacobian"]
    return store.block_inputs * store.num_outputs * shape[1] * dtype.itemsize


def prefetch_blocks(device: torch.device, store: JacobianStore) -> bool:
    """Read the next J block in the background: on a GPU, whose host idles while the tile multiplies,
    and only when a third block fits in the Jacobian workspace :func:`~.plan.tile_bytes` sets aside (one
    block at most: min(workspace, two blocks) holds one block exactly when it is at most the workspace).
    Not on the CPU, where the reading thread takes cycles from the BLAS threads (measured slower on
    2 cores, benchmarks/results/README.md)."""
    b = block_bytes(store)
    return device.type == "cuda" and b <= JAC_WORKSPACE


class BlockReader:
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
            self.bufs[b] = np.empty(block_bytes(store) // store.datasets["jacobian"][1].itemsize,
                                    store.datasets["jacobian"][1])
        return read_block(store, key[1], self.bufs[b]).to(self.device)

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


def read_block(store: JacobianStore, u: int, buf: np.ndarray | None = None) -> torch.Tensor:
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


def store_paths(out: Path, sides: int) -> list[Path]:
    return [out.with_name(f"{out.name}.jacobian{s + 1}.h5") for s in range(sides)]


def jacobian_phase(out: Path, job: dict, sides, batch, model, kind: KernelKind, c: int, p: int, t: int, d: Dist,
                   quiet: bool, overwrite: bool) -> list[JacobianStore]:
    """Every J block of every side into a resumable store beside ``out`` (blocks sharded over ranks)."""
    k = 1 if kind is KernelKind.PNTK else c
    paths = store_paths(out, len(sides))
    spec = {"kernel_file": out.name, **{key: job[key] for key in ("state_hash", "data_fingerprint", "kernel", "seed",
                                                                   "x1_split", "x1_n", "x2_split", "x2_n")}}

    def create() -> list[JacobianStore]:
        for s, (u8, path) in enumerate(zip(sides, paths, strict=True)):
            JacobianStore.create_for(path, job={**spec, "side": s + 1}, n_inputs=len(u8), num_outputs=k,
                                     n_params=p, block_inputs=t, overwrite=overwrite)
        return [JacobianStore(path) for path in paths]

    stores = d.create_then_open(create, lambda: [JacobianStore(path) for path in paths])
    with d.together():
        for s, (u8, store) in enumerate(zip(sides, stores, strict=True)):
            todo = [u for u, done in enumerate(store.complete) if not done and d.owns(u)]
            with store.writer() as w:
                for u in progress_bar(todo, desc=f"J blocks x{s + 1}", enabled=False if quiet or not d.main else None,
                                      unit="block"):
                    a, b = store.unit_inputs(u)
                    jb = jacobian_block(model, batch(u8, a, b), kind, c)
                    w.write("jacobian", a * k, jb)
                    w.mark_complete(u)
    return stores
