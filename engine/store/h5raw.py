"""Crash-safe HDF5 through preallocation and raw writes.

HDF5 is not journaled: a process killed while the library flushes metadata can
leave a file that no longer opens. The engine therefore fixes a file's whole
layout when it creates it (every dataset contiguous, its storage allocated
early) and afterwards writes only raw bytes into that storage at known file
offsets, with ``os.pwrite`` and ``fsync``. No metadata is ever rewritten, so a
crash can at worst leave one partially written row, which completion flags
(written last) mark as absent. Reads go through h5py or through a NumPy memory
map at the same offsets.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch

_TORCH_TO_NUMPY = {
    torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
    torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
    torch.uint8: np.uint8, torch.bool: np.bool_,
    # HDF5 has no bfloat16: its bits are stored as uint16 and tagged with the torch dtype.
    torch.bfloat16: np.uint16,
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype used to store a torch dtype on disk."""
    try:
        return np.dtype(_TORCH_TO_NUMPY[dtype])
    except KeyError:
        raise TypeError(f"cannot store torch dtype {dtype} in HDF5") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU NumPy view of ``t`` in its storage dtype (bfloat16 as its uint16 bits)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def torch_dtype_of(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of stored NumPy ``dtype``: uint16 is bfloat16's bits (the engine stores no other uint16)."""
    dtype = np.dtype(dtype)
    if dtype == np.uint16:
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, dtype)).dtype


def from_numpy(a: np.ndarray, torch_dtype: str | torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`to_numpy`: the one reader of stored arrays, bfloat16 bits included.

    ``torch_dtype`` is the stored tag (``"torch.bfloat16"``) where there is one; without it
    a uint16 array is read as bfloat16 bits (:func:`torch_dtype_of`). The tensor shares
    ``a``'s memory (no copy, read-only memory maps included: callers only read such tensors).
    """
    a = np.asarray(a)  # keeps 0-d scalars 0-d (np.ascontiguousarray would make them 1-d)
    bf16 = torch_dtype_of(a.dtype) == torch.bfloat16 if torch_dtype is None \
        else str(torch_dtype) == str(torch.bfloat16)
    if any(s < 0 for s in a.strides):
        a = a.copy()  # torch cannot view negative strides
    if bf16:
        a = a.view(np.int16)  # torch has no view from uint16 on every version; int16 has the same bits
    with warnings.catch_warnings():
        # Read-only memory maps: the tensor is only ever read, so torch's non-writable warning is moot.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if bf16 else t


def create_preallocated(group: h5py.Group, name: str, shape: tuple[int, ...],
                        dtype: np.dtype, fill: float | int | None = None) -> h5py.Dataset:
    """A contiguous dataset whose storage is allocated now, so its file offset is fixed.

    With ``fill=None`` the bytes are left as the file system gives them (no
    write pass, which matters for multi-GB checkpoint arrays); pass ``fill``
    for small datasets whose initial value matters (flags, logs).
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    ds = group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)
    if fill is not None and ds.size:
        ds[...] = np.full(shape, fill, dtype=dtype)
    elif ds.size:
        from .integrity import note_unfilled  # its rows get checksums only once written

        note_unfilled(group.file.filename, ds.name.lstrip("/"))
    return ds


def dataset_offset(ds: h5py.Dataset) -> int:
    """Byte offset of a contiguous, allocated dataset's storage in its file."""
    off = ds.id.get_offset()
    if off is None:
        raise ValueError(f"dataset {ds.name} has no allocated contiguous storage")
    return int(off)


class RawWriter:
    """Writes bytes at fixed offsets of an HDF5 file without touching its metadata."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR)

    def write(self, offset: int, data: np.ndarray) -> None:
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        done = 0
        while done < len(buf):
            done += os.pwrite(self._fd, buf[done:], offset + done)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RawWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()
