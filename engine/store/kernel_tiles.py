"""One large kernel stored tile by tile: ``entk kernel``'s output, read with :func:`open_kernel`.

The logical matrix is ``(M1, M2)`` (``M = N·C`` for the full kernel, ``N`` for traced and pNTK;
the diagonal kernel ``(N, C, C)`` is stored as ``(N, C·C)`` with one tile column). It is cut
into a grid of ``tile_rows × tile_cols`` tiles; a symmetric kernel (``x2`` not given) stores
only the tiles on and above the diagonal, numbered row by row. Every tile is one unit of the
:class:`~engine.store.blockfile.BlockFile` it lives in: written raw, then flagged complete, so
a job killed at any moment resumes at tile granularity. Layout for other readers: docs/FORMAT.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .blockfile import BlockFile, BlockWriter, StoreError


def tile_grid(m1: int, m2: int, tile_rows: int, tile_cols: int, symmetric: bool) -> list[tuple[int, int]]:
    """The stored tiles ``(i, j)`` in storage order: row-major, upper triangle only if symmetric."""
    gi, gj = -(-m1 // tile_rows), -(-m2 // tile_cols)
    return [(i, j) for i in range(gi) for j in range(i if symmetric else 0, gj)]


class KernelTiles(BlockFile):
    """``/data/tiles``: ``(n_tiles, tile_rows, tile_cols)``; tile ``k`` is grid cell ``/data/tile_index[k]``.

    Edge tiles are zero-padded to the full tile shape. Unit ``k < n_tiles`` is tile ``k``;
    unit ``n_tiles`` is the input record (``tile_index``, ``x1_index``, ``x1_labels`` and, for
    a cross-kernel, ``x2_index``, ``x2_labels``), written before any tile.
    """

    FORMAT = "entk-kernel-tiles"
    NOUN = "entk tiled kernel file"

    @classmethod
    def create_for(cls, path: str | Path, *, job: Mapping, matrix_shape: tuple[int, int],
                   kernel_shape: tuple[int, ...], tile_rows: int, tile_cols: int, symmetric: bool,
                   n1: int, n2: int | None, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False) -> KernelTiles:
        m1, m2 = (int(v) for v in matrix_shape)
        if symmetric and (m1 != m2 or tile_rows != tile_cols or n2 is not None):
            raise StoreError(f"a symmetric kernel needs a square matrix and square tiles, got {m1}x{m2} "
                             f"with {tile_rows}x{tile_cols} tiles")
        if dtype not in (torch.float32, torch.float64):
            raise StoreError(f"kernel tiles are stored as float32 or float64, got {dtype}")
        grid = tile_grid(m1, m2, tile_rows, tile_cols, symmetric)
        job = {**job, "matrix_shape": [m1, m2], "kernel_shape": [int(v) for v in kernel_shape],
               "tile_rows": int(tile_rows), "tile_cols": int(tile_cols), "symmetric": bool(symmetric),
               "n_tiles": len(grid), "dtype": str(dtype)}
        datasets = {"tiles": ((len(grid), tile_rows, tile_cols), dtype),
                    "tile_index": ((len(grid), 2), torch.int64),
                    "x1_index": ((n1,), torch.int64), "x1_labels": ((n1,), torch.int64)}
        if n2 is not None:
            datasets["x2_index"] = ((n2,), torch.int64)
            datasets["x2_labels"] = ((n2,), torch.int64)
        return cls.open_or_create(path, job=job, overwrite=overwrite, n_units=len(grid) + 1, datasets=datasets)

    # -- geometry ----------------------------------------------------------------------------

    @property
    def symmetric(self) -> bool:
        return bool(self.job["symmetric"])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return tuple(self.job["matrix_shape"])

    @property
    def tile_shape(self) -> tuple[int, int]:
        return int(self.job["tile_rows"]), int(self.job["tile_cols"])

    @property
    def n_tiles(self) -> int:
        return int(self.job["n_tiles"])

    def grid(self) -> list[tuple[int, int]]:
        tr, tc = self.tile_shape
        return tile_grid(*self.matrix_shape, tr, tc, self.symmetric)

    def tile_bounds(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)`` of grid cell ``(i, j)`` in the logical matrix."""
        (m1, m2), (tr, tc) = self.matrix_shape, self.tile_shape
        return i * tr, min((i + 1) * tr, m1), j * tc, min((j + 1) * tc, m2)

    @property
    def inputs_recorded(self) -> bool:
        return bool(self.complete[self.n_tiles])

    # -- writing -----------------------------------------------------------------------------

    def record_inputs(self, w: BlockWriter, x1_index, x1_labels, x2_index=None, x2_labels=None) -> None:
        """Write the input record (unit ``n_tiles``); idempotent, done before any tile."""
        w.write("tile_index", 0, np.asarray(self.grid(), dtype=np.int64).reshape(-1, 2))
        w.write("x1_index", 0, np.asarray(x1_index, np.int64))
        w.write("x1_labels", 0, np.asarray(x1_labels, np.int64))
        if "x2_index" in self.datasets:
            w.write("x2_index", 0, np.asarray(x2_index, np.int64))
            w.write("x2_labels", 0, np.asarray(x2_labels, np.int64))
        w.mark_complete(self.n_tiles)

    def write_tile(self, w: BlockWriter, k: int, block: torch.Tensor, *, flag: bool = True) -> None:
        """Write tile ``k`` (its true, unpadded shape), zero-padded, then flag it complete."""
        i, j = self.grid()[k]
        r0, r1, c0, c1 = self.tile_bounds(i, j)
        if tuple(block.shape) != (r1 - r0, c1 - c0):
            raise StoreError(f"tile {k} ({i}, {j}) must be {(r1 - r0, c1 - c0)}, got {tuple(block.shape)}")
        tr, tc = self.tile_shape
        if (r1 - r0, c1 - c0) == (tr, tc):
            padded = block.reshape(1, tr, tc)  # a whole tile: no padded copy
        else:
            padded = torch.zeros((1, tr, tc), dtype=self.torch_dtype("tiles"))
            padded[0, : r1 - r0, : c1 - c0] = block
        w.write("tiles", k, padded)
        if flag:
            w.mark_complete(k)


class TiledKernel:
    """A stored tiled kernel: ``.shape``, ``.attrs``, NumPy-style ``K[r0:r1, c0:c1]``.

    Reads go through a memory map, tile by tile; a symmetric file's lower triangle is the
    mirror of its stored upper tiles. Indexing takes ints, slices (any step) and integer
    arrays per axis (read as their bounding box, then selected); reading a tile that was
    never computed raises :class:`StoreError`. The diagonal kernel has shape ``(N, C, C)``
    and is indexed by sample first.
    """

    def __init__(self, path: str | Path):
        self.file = KernelTiles(path)
        f = self.file
        self.path = f.path
        self.attrs: dict = dict(f.job)
        self.shape: tuple[int, ...] = tuple(int(v) for v in f.job["kernel_shape"])
        self.matrix_shape: tuple[int, int] = f.matrix_shape
        self.symmetric = f.symmetric
        self.tile_shape = f.tile_shape
        self.dtype = f.datasets["tiles"][1]
        self._grid = f.grid()
        self._id = {ij: k for k, ij in enumerate(self._grid)}
        self._tiles = f.memmap("tiles")
        self._valid: set[int] = set()  # tiles already checked (a solver reads every tile many times)

    def __repr__(self) -> str:
        done = int(self.complete.sum())
        return (f"TiledKernel({str(self.path)!r}, kind={self.attrs.get('kernel')!r}, shape={self.shape}, "
                f"tiles {done}/{len(self._grid)} complete)")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def complete(self) -> np.ndarray:
        """bool ``(n_tiles,)``: which stored tiles are computed."""
        return self.file.complete[: len(self._grid)]

    @property
    def is_complete(self) -> bool:
        return bool(self.file.complete.all())

    def _array(self, name: str) -> np.ndarray | None:
        if name not in self.file.datasets:
            return None
        if not self.file.inputs_recorded:
            raise StoreError(f"{self.path}: the input record was never written (the job stopped before its first tile)")
        return np.array(self.file.verified(name))

    @property
    def x1_index(self) -> np.ndarray:
        """Indices of the row inputs in their split of the dataset (``attrs['x1_split']``)."""
        return self._array("x1_index")

    @property
    def x1_labels(self) -> np.ndarray:
        return self._array("x1_labels")

    @property
    def x2_index(self) -> np.ndarray:
        """Column inputs (the row inputs for a symmetric kernel)."""
        return self.x1_index if self.symmetric else self._array("x2_index")

    @property
    def x2_labels(self) -> np.ndarray:
        return self.x1_labels if self.symmetric else self._array("x2_labels")

    # -- tiles -------------------------------------------------------------------------------

    def stored_tiles(self) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        """Every stored tile as ``(r0, r1, c0, c1, block)``, in storage order (each once).

        For a symmetric kernel only tiles with ``c0 >= r0`` appear; streaming consumers
        apply an off-diagonal tile and its transpose.
        """
        done = self.complete
        for k, (i, j) in enumerate(self._grid):
            r0, r1, c0, c1 = self.file.tile_bounds(i, j)
            if not done[k]:
                self._missing(i, j)
            yield r0, r1, c0, c1, self._checked(k, np.asarray(self._tiles[k, : r1 - r0, : c1 - c0]))

    def _checked(self, k: int, blk: np.ndarray) -> np.ndarray:
        """``blk`` (stored tile ``k``) once it is known to be a kernel's: finite, and exactly symmetric on the
        diagonal of a symmetric kernel (the job writes those tiles from their upper triangle)."""
        if k in self._valid:
            return blk
        self.file.verify_rows("tiles", k, k + 1)
        i, j = self._grid[k]
        if not np.isfinite(blk).all():
            bad = np.argwhere(~np.isfinite(blk))[0]
            raise StoreError(f"{self.path}: tile ({i}, {j}) is not finite (NaN or inf at row {int(bad[0])}, column "
                             f"{int(bad[1])} of the tile); the kernel is unusable: recompute it with --overwrite")
        if self.symmetric and i == j and not np.array_equal(blk, blk.T):
            raise StoreError(f"{self.path}: tile ({i}, {j}) on the diagonal of a symmetric kernel is not symmetric; "
                             f"the file is damaged: recompute it with --overwrite")
        self._valid.add(k)
        return blk

    def _missing(self, i: int, j: int):
        done = self.complete
        raise StoreError(f"tile ({i}, {j}) of {self.path} is not computed yet ({int(done.sum())}/{len(done)} "
                         f"tiles complete); rerun the job that wrote it to finish")

    def tile(self, i: int, j: int) -> np.ndarray:
        """Grid cell ``(i, j)`` (trimmed; mirrored from ``(j, i)`` below a symmetric diagonal)."""
        flip = self.symmetric and j < i
        k = self._id.get((j, i) if flip else (i, j))
        if k is None:
            raise IndexError(f"tile ({i}, {j}) is outside the {self._grid[-1]} grid of {self.path}")
        if not self.complete[k]:
            self._missing(i, j)
        a, b = (j, i) if flip else (i, j)
        r0, r1, c0, c1 = self.file.tile_bounds(a, b)
        blk = self._checked(k, np.asarray(self._tiles[k, : r1 - r0, : c1 - c0]))
        return blk.T if flip else blk

    def _dense(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        out = np.empty((r1 - r0, c1 - c0), dtype=self.dtype)
        if out.size == 0:
            return out
        tr, tc = self.tile_shape
        for i in range(r0 // tr, (r1 - 1) // tr + 1):
            for j in range(c0 // tc, (c1 - 1) // tc + 1):
                t = self.tile(i, j)
                a0, a1 = max(r0, i * tr), min(r1, i * tr + t.shape[0])
                b0, b1 = max(c0, j * tc), min(c1, j * tc + t.shape[1])
                out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = t[a0 - i * tr : a1 - i * tr, b0 - j * tc : b1 - j * tc]
        return out

    @staticmethod
    def _axis(key, n: int, axis: int) -> tuple[np.ndarray | slice, bool]:
        """One axis of a key as (index array or contiguous slice, squeeze?)."""
        if isinstance(key, (int, np.integer)):
            k = int(key)
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for axis {axis} with size {n}")
            k %= n
            return slice(k, k + 1), True
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return slice(start, max(start, stop)), False
            return np.arange(start, stop, step), False
        idx = np.asarray(key)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise IndexError(f"axis {axis}: only ints, slices and 1-D integer arrays are supported, got {key!r}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"axis {axis}: indices out of bounds for size {n}")
        return idx % n, False

    def _read(self, rows, cols) -> np.ndarray:
        m1, m2 = self.matrix_shape
        (rs, rsq), (cs, csq) = self._axis(rows, m1, 0), self._axis(cols, m2, 1)

        def box(s):
            if isinstance(s, slice):
                return s.start, s.stop, None
            if not s.size:
                return 0, 0, s
            lo = int(s.min())
            return lo, int(s.max()) + 1, s - lo

        r0, r1, ri = box(rs)
        c0, c1, ci = box(cs)
        out = self._dense(r0, r1, c0, c1)
        if ri is not None:
            out = out[ri]
        if ci is not None:
            out = out[:, ci]
        if rsq and csq:
            return out[0, 0]
        return out[0] if rsq else out[:, 0] if csq else out

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for a kernel of shape {self.shape}")
        if self.ndim == 2:
            key = key + (slice(None),) * (2 - len(key))
            return self._read(key[0], key[1])
        # Diagonal kernel (N, C, C), stored as (N, C·C): read the samples, then index the blocks.
        c = self.shape[1]
        rows = self._read(key[0], slice(None))
        squeeze = rows.ndim == 1
        blocks = rows.reshape((-1, c, c))
        rest = key[1:]
        return blocks[(0, *rest)] if squeeze else blocks[(slice(None), *rest)]

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def to_numpy(self) -> np.ndarray:
        """The whole kernel in memory (only for kernels that fit)."""
        return self[:]


def open_kernel(path: str | Path) -> TiledKernel:
    """Open a tiled kernel file written by ``entk kernel`` / ``engine.jobs.kernel_job``."""
    return TiledKernel(path)
