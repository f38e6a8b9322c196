"""The one storage layer: crash-safe HDF5 files of fixed layout, written raw, flags last.

Every engine file (run files, Jacobian and kernel stores, chaos grids) is a
:class:`StoreFile`: created once under a temporary name with every dataset
preallocated and contiguous (``engine.store.h5raw``) and its disk space reserved,
so a full disk is reported before the work starts; afterwards only raw bytes are
written at fixed offsets, and a unit of work is flagged complete (in a uint8 flag
dataset) only after its bytes are synced. Opening checks the ``format`` and
``format_version`` attributes. Readers get NumPy memory maps of the datasets (no
copy through h5py).

A long job (a Jacobian streamed block by block, the kernels of many checkpoints) is
a :class:`BlockFile`: described by a ``job`` dict, datasets under ``/data``, flags in
``/units/complete``; rerunning the same job skips completed units and a file that
holds a different job is refused, naming the fields that differ.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

from ..errors import RunFileError
from . import integrity
from .data_record import data_mismatch
from .h5raw import RawWriter, create_preallocated, dataset_offset, from_numpy, numpy_dtype, to_numpy, torch_dtype_of


class StoreError(RunFileError):
    """A store file is missing, malformed, or holds a different job."""


class DatasetInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int        # byte offset of the contiguous storage; -1 for zero-size datasets
    torch_dtype: str   # e.g. "torch.bfloat16" (stored as its uint16 bits)


def _jsonable(d: Mapping) -> dict:
    return json.loads(json.dumps(dict(d), sort_keys=True, default=str))


def check_output_path(path: Path, noun: str, *, overwrite: bool) -> None:
    """One-line errors for an output path that cannot become a file, before any work."""
    if path.is_dir():
        raise StoreError(f"{path} is a directory; expected the path of {noun} to write (e.g. {path / 'out.h5'})")
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists (pass overwrite to replace it)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"cannot create {path}: {parent} is a file, not a directory")
            break


class StoreFile:
    """An open engine file of one ``FORMAT``; subclasses define the layout (``_load``, ``create``)."""

    FORMAT = "entk-file"
    VERSION = 2                 # 2: checksums (engine/store/integrity.py); 1 is read unchecked
    NOUN = "entk file"          # what the file is, for messages ("entk run file")
    FLAGS = "units/complete"    # the uint8 completion flag of each unit of work

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not {_a(self.NOUN)}")
        if not self.path.exists():
            raise StoreError(f"{self.NOUN} {self.path} does not exist")
        try:
            self._sums = integrity.check(self.path, _a(self.NOUN))  # before h5py parses a byte of it
        except integrity.DamagedFileError as e:
            raise StoreError(str(e)) from None
        try:
            with h5py.File(self.path, "r") as f:
                fmt = f.attrs.get("format")
                if fmt != self.FORMAT:
                    raise StoreError(f"{self.path} is not {_a(self.NOUN)} (format attribute {fmt!r}, "
                                     f"expected {self.FORMAT!r})")
                version = int(f.attrs["format_version"])
                if version > self.VERSION:
                    raise StoreError(f"{self.path} has format version {version}; "
                                     f"this engine reads <= {self.VERSION}")
                self.datasets: dict[str, DatasetInfo] = {}
                self._load(f)
                self.n_units = int(f[self.FLAGS].shape[0])
                self._flags = dataset_offset(f[self.FLAGS])
                self._rows = self._row_sums()
        except StoreError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise StoreError(f"cannot read {self.NOUN} {self.path}: {e}") from None

    def _load(self, f: h5py.File) -> None:
        """Read the layout's attributes and index its datasets (``self._index``)."""

    def _row_sums(self) -> dict[str, tuple[int, int]]:
        """Dataset name -> (first entry in /integrity/crc, rows) for every dataset with row checksums."""
        if self._sums is None:
            return {}
        by_off = {int(o): (int(first), int(rows)) for o, _, first, rows in self._sums.extents.tolist() if rows}
        return {name: by_off[info.offset] for name, info in self.datasets.items() if info.offset in by_off}

    def verify_rows(self, name: str, r0: int = 0, r1: int | None = None, *, written_only: bool = False) -> int:
        """Check rows ``[r0, r1)`` of dataset ``name`` against their checksums; the number checked.

        A row never written is refused as damaged unless ``written_only`` (``entk verify``, which
        skips the rows of units not done yet). Files without checksums (version 1) pass unchecked.
        """
        if name not in self._rows:
            return 0
        first, rows = self._rows[name]
        r1 = rows if r1 is None else min(r1, rows)
        if r1 <= r0:
            return 0
        shape, dtype, off, _ = self.datasets[name]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if len(shape) else dtype.itemsize
        checked = 0
        with open(self.path, "rb") as fh:
            step = max(1, (64 << 20) // max(row_bytes, 1))
            for a in range(r0, r1, step):
                b = min(r1, a + step)
                fh.seek(self._sums.crc_offset + 8 * (first + a))
                want = np.frombuffer(fh.read(8 * (b - a)), dtype=np.uint64)
                fh.seek(off + a * row_bytes)
                got = integrity.row_entries(fh.read((b - a) * row_bytes), b - a)
                for i in np.flatnonzero(want != got):
                    if want[i] == 0 and written_only:
                        continue
                    what = "was never written" if want[i] == 0 else "fails its checksum"
                    raise integrity.DamagedFileError(f"{self.path} is damaged: row {a + int(i)} of {name} {what}")
                checked += int(np.count_nonzero(want)) if written_only else b - a
        return checked

    def verified(self, name: str, *, written_only: bool = False) -> np.memmap:
        """:meth:`memmap` of ``name`` once every row of it has passed its checksum (a dataset read whole;
        ``written_only``: the rows written so far, for a reader of an unfinished job that masks the rest)."""
        self.verify_rows(name, written_only=written_only)
        return self.memmap(name)

    def _index(self, f: h5py.File, name: str) -> None:
        """Record dataset ``name``'s shape, dtype and offset; a group's datasets one by one."""
        obj = f[name]
        if isinstance(obj, h5py.Group):
            for child in obj:
                self._index(f, f"{name}/{child}")
            return
        tag = obj.attrs.get("torch_dtype", str(torch_dtype_of(obj.dtype)))
        self.datasets[name] = DatasetInfo(tuple(obj.shape), obj.dtype,
                                          dataset_offset(obj) if obj.size else -1, str(tag))

    @classmethod
    def check_output(cls, path: str | Path, *, overwrite: bool = False) -> None:
        """Raise the one-line error :meth:`_create` would, before any long work."""
        check_output_path(Path(path), _a(cls.NOUN), overwrite=overwrite)

    @classmethod
    def _create(cls, path: str | Path, build: Callable[[h5py.File], None], *, overwrite: bool = False):
        """Lay the file out with ``build(f)`` under a temporary name, reserve its disk space, rename it
        into place and open it."""
        path = Path(path)
        check_output_path(path, _a(cls.NOUN), overwrite=overwrite)
        tmp = path.with_name(path.name + ".creating")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(tmp, "w", libver="earliest", userblock_size=integrity.HEADER_SIZE) as f:
                f.attrs["format"] = cls.FORMAT
                f.attrs["format_version"] = cls.VERSION
                build(f)
                integrity.plan(f, cls.FLAGS)
            integrity.seal(tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot create {path}: {e.strerror or e}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        size = os.path.getsize(tmp)
        try:
            # Reserve the blocks now: a disk that cannot hold the result fails here, not hours in.
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                tmp.unlink(missing_ok=True)
                if e.errno == errno.ENOSPC:
                    raise StoreError(f"not enough disk space for {path} ({size / 2**30:.2f} GiB)") from None
                raise StoreError(f"cannot reserve {size / 2**30:.2f} GiB for {path}: {e.strerror}") from None
        os.replace(tmp, path)
        return cls(path)

    # -- reading -----------------------------------------------------------------------------

    @property
    def complete(self) -> np.ndarray:
        """bool ``(n_units,)``: which units are fully written."""
        with open(self.path, "rb") as fh:
            fh.seek(self._flags)
            flags = np.frombuffer(fh.read(self.n_units), dtype=np.uint8)
        if flags.size != self.n_units or flags.max(initial=0) > 1:
            bad = [int(u) for u in np.flatnonzero(flags > 1)[:3]]
            raise integrity.DamagedFileError(f"{self.path} is damaged: completion flags of units {bad} are not 0 or 1 "
                                             f"({self.FLAGS})")
        return flags.astype(bool)

    def memmap(self, name: str) -> np.memmap:
        """Read-only memory map of dataset ``name`` in its storage dtype."""
        shape, dtype, off, _ = self.datasets[name]
        if off < 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=off, shape=shape)

    def torch_dtype(self, name: str) -> torch.dtype:
        return getattr(torch, self.datasets[name].torch_dtype.removeprefix("torch."))

    def read(self, name: str, index=slice(None)) -> torch.Tensor:
        """``dataset[index]`` as a torch tensor (copied out of the memory map), its rows checked."""
        n = self.datasets[name].shape[0] if self.datasets[name].shape else 1
        if isinstance(index, (int, np.integer)):
            self.verify_rows(name, int(index) % max(n, 1), int(index) % max(n, 1) + 1)
        elif isinstance(index, slice) and index.step in (None, 1):
            a, b, _ = index.indices(n)
            self.verify_rows(name, a, b)
        else:
            self.verify_rows(name)
        return from_numpy(np.array(self.memmap(name)[index]), self.datasets[name].torch_dtype)

    # -- writing -----------------------------------------------------------------------------

    def writer(self) -> BlockWriter:
        return BlockWriter(self)


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


class BlockFile(StoreFile):
    """A resumable job file: ``job`` attribute, datasets under ``/data``, one flag per unit."""

    FORMAT = "entk-blocks"
    NOUN = "entk job file"

    def _load(self, f: h5py.File) -> None:
        self.job: dict = json.loads(f.attrs["job"])
        self.data: dict | None = json.loads(f.attrs["data"]) if "data" in f.attrs else None
        self._index(f, "data")
        self.datasets = {k.removeprefix("data/"): v for k, v in self.datasets.items()}
        self.attrs = {name: dict(ds.attrs) for name, ds in f["data"].items()}

    @classmethod
    def create(cls, path: str | Path, *, job: Mapping, n_units: int,
               datasets: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
               attrs: Mapping[str, Mapping] | None = None, data: Mapping | None = None,
               overwrite: bool = False):
        """Create the file with storage for every dataset; reserve its disk space.

        ``data`` is the record of the data the job uses (``data_record``), kept beside the job.
        """
        def build(f: h5py.File) -> None:
            f.attrs["job"] = json.dumps(_jsonable(job), sort_keys=True)
            if data is not None:
                f.attrs["data"] = json.dumps(_jsonable(data), sort_keys=True)
            units = f.create_group("units")
            create_preallocated(units, "complete", (n_units,), np.uint8, fill=0)
            grp = f.create_group("data")
            for name, (shape, dtype) in datasets.items():
                ds = create_preallocated(grp, name, tuple(shape), numpy_dtype(dtype))
                ds.attrs["torch_dtype"] = str(dtype)
                for k, v in (attrs or {}).get(name, {}).items():
                    ds.attrs[k] = v

        return cls._create(path, build, overwrite=overwrite)

    @classmethod
    def open_or_create(cls, path: str | Path, *, job: Mapping, data: Mapping | None = None,
                       overwrite: bool = False, **create_kwargs):
        """Resume the job in ``path`` if it holds this job (on the same ``data``, when given), else create it.

        The data is compared by fingerprint, not by path: a job may resume on data that moved.
        """
        path = Path(path)
        if path.exists() and not path.is_dir() and not overwrite:
            f = cls(path)
            want = _jsonable(job)
            diff = sorted(k for k in set(want) | set(f.job) if want.get(k) != f.job.get(k))
            if diff:
                raise StoreError(f"{path} holds a different job (differs in {', '.join(diff)}); "
                                 f"pass overwrite (--overwrite) or choose another output")
            if data is not None:
                bad = data_mismatch(path, f.data, data, what="holds a job computed",
                                    fix="pass overwrite (--overwrite) or choose another output")
                if bad:
                    raise StoreError(bad)
            return f
        return cls.create(path, job=job, data=data, overwrite=overwrite, **create_kwargs)


class BlockWriter:
    """Raw writes into a :class:`StoreFile`; ``mark_complete`` syncs data before the flag."""

    def __init__(self, f: StoreFile):
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
        if off < 0:
            return  # zero-size dataset: nothing to store
        try:
            self._raw.write(off + first_row * row_elems * dtype.itemsize, a)
            sums = self.f._rows.get(name)
            if sums is not None:  # the rows' checksums, after their bytes, before any completion flag
                n = a.size // max(row_elems, 1)
                self._raw.write(self.f._sums.crc_offset + 8 * (sums[0] + first_row), integrity.row_entries(a, n))
        except OSError as e:
            raise StoreError(f"writing {name} rows from {first_row} to {self.f.path} failed ({e.strerror}); "
                             f"completed units are kept: rerun the same command to resume") from None

    def sync(self) -> None:
        self._raw.sync()

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
