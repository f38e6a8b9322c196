"""A resumable HDF5 job file: fixed layout, work units written raw, flags last.

A long job (a Jacobian streamed block by block, the kernels of many checkpoints)
is described by a ``job`` dict. The file is created once with every dataset
preallocated and contiguous (``engine.store.h5raw``), and the disk space reserved, so
a full disk is reported before the work starts. Each unit of work is written as
raw bytes at fixed offsets and then flagged complete in ``/units/complete``;
rerunning the same job skips completed units. Opening a file that holds a
different job is refused, naming the fields that differ. Readers get NumPy
memory maps of the datasets (no copy through h5py).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import RunFileError
from .h5raw import RawWriter, create_preallocated, dataset_offset, from_numpy, numpy_dtype, to_numpy


class StoreError(RunFileError):
    """A store file is missing, malformed, or holds a different job."""


def _jsonable(d: Mapping) -> dict:
    return json.loads(json.dumps(dict(d), sort_keys=True, default=str))


class BlockFile:
    """An open job file of one ``FORMAT``; subclasses name the format and datasets."""

    FORMAT = "entk-blocks"
    VERSION = 1

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path} does not exist")
        try:
            with h5py.File(self.path, "r") as f:
                fmt = f.attrs.get("format")
                if fmt != self.FORMAT:
                    raise StoreError(f"{self.path} is not an {self.FORMAT} file (format {fmt!r})")
                if int(f.attrs["format_version"]) > self.VERSION:
                    raise StoreError(f"{self.path} has format version {f.attrs['format_version']}; "
                                     f"this engine reads <= {self.VERSION}")
                self.job: dict = json.loads(f.attrs["job"])
                self.n_units = int(f["units/complete"].shape[0])
                self._flags = dataset_offset(f["units/complete"])
                self.datasets: dict[str, tuple[tuple[int, ...], np.dtype, int, str]] = {}
                for name, ds in f["data"].items():
                    off = dataset_offset(ds) if ds.size else -1
                    self.datasets[name] = (ds.shape, ds.dtype, off, ds.attrs["torch_dtype"])
                self.attrs = {name: dict(ds.attrs) for name, ds in f["data"].items()}
        except StoreError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise StoreError(f"cannot read {self.path}: {e}") from None

    @classmethod
    def create(cls, path: str | Path, *, job: Mapping, n_units: int,
               datasets: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
               attrs: Mapping[str, Mapping] | None = None, overwrite: bool = False):
        """Create the file with storage for every dataset; reserve its disk space."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise StoreError(f"{path} already exists (pass overwrite to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".creating")
        with h5py.File(tmp, "w", libver="earliest") as f:
            f.attrs["format"] = cls.FORMAT
            f.attrs["format_version"] = cls.VERSION
            f.attrs["job"] = json.dumps(_jsonable(job), sort_keys=True)
            units = f.create_group("units")
            create_preallocated(units, "complete", (n_units,), np.uint8, fill=0)
            data = f.create_group("data")
            for name, (shape, dtype) in datasets.items():
                ds = create_preallocated(data, name, tuple(shape), numpy_dtype(dtype))
                ds.attrs["torch_dtype"] = str(dtype)
                for k, v in (attrs or {}).get(name, {}).items():
                    ds.attrs[k] = v
        size = os.path.getsize(tmp)
        try:
            # Reserve the blocks now: a disk that cannot hold the result fails here, not hours in.
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise StoreError(f"not enough disk space for {path} ({size / 2**30:.2f} GiB)") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        os.replace(tmp, path)
        return cls(path)

    @classmethod
    def open_or_create(cls, path: str | Path, *, job: Mapping, overwrite: bool = False, **create_kwargs):
        """Resume the job in ``path`` if it holds this job, else create it."""
        path = Path(path)
        if path.exists() and not overwrite:
            f = cls(path)
            want = _jsonable(job)
            diff = sorted(k for k in set(want) | set(f.job) if want.get(k) != f.job.get(k))
            if diff:
                raise StoreError(f"{path} holds a different job (differs in {', '.join(diff)}); "
                                 f"pass overwrite (--overwrite) or choose another output")
            return f
        return cls.create(path, job=job, overwrite=overwrite, **create_kwargs)

    # -- reading -----------------------------------------------------------------------------

    @property
    def complete(self) -> np.ndarray:
        with open(self.path, "rb") as fh:
            fh.seek(self._flags)
            return np.frombuffer(fh.read(self.n_units), dtype=np.uint8).astype(bool)

    def memmap(self, name: str) -> np.memmap:
        """Read-only memory map of dataset ``name`` in its storage dtype."""
        shape, dtype, off, _ = self.datasets[name]
        if off < 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=off, shape=shape)

    def torch_dtype(self, name: str) -> torch.dtype:
        return getattr(torch, self.datasets[name][3].removeprefix("torch."))

    def read(self, name: str, index=slice(None)) -> torch.Tensor:
        """``dataset[index]`` as a torch tensor (copied out of the memory map)."""
        return from_numpy(np.array(self.memmap(name)[index]), str(self.torch_dtype(name)))

    # -- writing -----------------------------------------------------------------------------

    def writer(self) -> BlockWriter:
        return BlockWriter(self)


class BlockWriter:
    """Raw writes into a :class:`BlockFile`; ``mark_complete`` syncs data before the flag."""

    def __init__(self, f: BlockFile):
        self.f = f
        self._raw = RawWriter(f.path)

    def write(self, name: str, first_row: int, rows: torch.Tensor | np.ndarray) -> None:
        """Write ``rows`` (leading dim = rows of dataset ``name``) starting at ``first_row``."""
        shape, dtype, off, _ = self.f.datasets[name]
        if isinstance(rows, torch.Tensor):
            a = to_numpy(rows.detach().to("cpu", self.f.torch_dtype(name)))
        else:
            a = np.ascontiguousarray(rows, dtype=dtype)
        row_elems = int(np.prod(shape[1:], dtype=np.int64))
        if a.size % max(row_elems, 1) or first_row + a.size // max(row_elems, 1) > shape[0]:
            raise StoreError(f"{name}: {a.shape} at row {first_row} does not fit dataset {shape}")
        try:
            self._raw.write(off + first_row * row_elems * dtype.itemsize, a)
        except OSError as e:
            raise StoreError(f"writing {name} rows from {first_row} to {self.f.path} failed ({e.strerror}); "
                             f"completed units are kept: rerun the same command to resume") from None

    def mark_complete(self, unit: int) -> None:
        self._raw.sync()
        self._raw.write(self.f._flags + unit, np.uint8([1]))
        self._raw.sync()

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
