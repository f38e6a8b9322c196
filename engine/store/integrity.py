"""Checksums of engine files (format version 2): damage is refused by name, never read or crashed on.

A file begins with a 512-byte header (an HDF5 user block, which HDF5 skips) that holds:

- the CRC32 of the file's *metadata*: every byte after the header that is not dataset storage
  (HDF5's superblock, object headers, B-trees, heaps, attributes), checked **before** h5py parses
  the file, so that a damaged offset is never followed (one flipped byte there made h5py crash the
  process with a segmentation fault);
- where the *extents* table is (``/integrity/extents``: one row ``(offset, nbytes, first, rows)``
  per dataset, sorted by offset) and its CRC32;
- the header's own CRC32.

Every dataset row (the leading index: a checkpoint, a tile, a Jacobian row, a log entry) has an
entry in ``/integrity/crc`` (uint64): ``ROW_TAG << 32 | crc32(row bytes)`` once written, 0 while
never written. Writers set it after the row's bytes and before the unit's completion flag; readers
check the rows they read. Completion flags carry no CRC (a crash between a flag and its CRC would
leave an undamaged file looking damaged); a flag byte must be 0 or 1.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import RunFileError

HEADER_SIZE = 512
MAGIC = b"ENTK-CRC"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ROW_TAG = 0x454E544B  # "ENTK": the high word of a written row's entry
_HEAD = struct.Struct("<8sIIQQQII")  # magic, layout version, n_extents, file size, extents offset, crc offset,
#                                      extents crc, metadata crc; then the header's own crc
_CHUNK = 64 << 20
_UNFILLED: dict[str, set[str]] = {}  # datasets created without a fill, by file being built: never written yet


class DamagedFileError(RunFileError):
    """A stored checksum does not match: the file (or the named part of it) is damaged."""


class Header(NamedTuple):
    size: int
    extents: np.ndarray  # (n, 4) uint64: offset, nbytes, first crc entry, rows (0: no row checksums)
    crc_offset: int


def crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def note_unfilled(filename: str, name: str) -> None:
    """Called by ``create_preallocated`` for a dataset left as the file system gives it (no row written)."""
    _UNFILLED.setdefault(os.path.abspath(filename), set()).add(name)


# -- creation ---------------------------------------------------------------------------------------


def plan(f, flags: str | None) -> None:
    """Add ``/integrity/crc`` and ``/integrity/extents`` to an h5py file being built (before it is closed)."""
    import h5py

    from .h5raw import create_preallocated, dataset_offset

    dsets = []
    f.visititems(lambda name, obj: dsets.append(obj) if isinstance(obj, h5py.Dataset) and obj.size else None)
    rows, first = [], 0
    for ds in dsets:
        n = 0 if ds.name.lstrip("/") == flags else (ds.shape[0] if ds.ndim else 1)
        rows.append([dataset_offset(ds), ds.id.get_storage_size(), first, n])
        first += n
    grp = f.create_group("integrity")
    table = create_preallocated(grp, "crc", (max(first, 1),), np.uint64, fill=0)
    rows.append([dataset_offset(table), table.id.get_storage_size(), 0, 0])
    ext = np.array(sorted(rows), dtype=np.uint64).reshape(-1, 4)
    grp.create_dataset("extents", data=ext)
    grp.attrs["datasets"] = ",".join(ds.name for ds in dsets)


def seal(path: str | Path) -> None:
    """Compute every row checksum of the rows that hold data, then the metadata CRC and the header."""
    import h5py

    path = Path(path)
    unfilled = _UNFILLED.pop(os.path.abspath(path), set())
    with h5py.File(path, "r") as f:
        ext_ds = f["integrity/extents"]
        ext = np.array(ext_ds[...], dtype=np.uint64)
        ext_off = int(ext_ds.id.get_offset())
        crc_off = int(f["integrity/crc"].id.get_offset())
        by_offset = {}
        for name in f["integrity"].attrs["datasets"].split(","):
            if name:
                by_offset[int(f[name].id.get_offset())] = name
    fd = os.open(path, os.O_RDWR)
    try:
        for off, nbytes, first, rows in ext.tolist():
            if rows == 0 or by_offset.get(off, "").lstrip("/") in unfilled:
                continue
            entries = row_entries(_pread(fd, off, nbytes), rows)
            _pwrite(fd, crc_off + 8 * first, entries)
        os.fsync(fd)
        _write_header(fd, path, ext, ext_off, crc_off)
    finally:
        os.close(fd)


def row_entries(data: bytes | memoryview | np.ndarray, rows: int) -> np.ndarray:
    """The uint64 entries of ``rows`` equal rows packed in ``data``."""
    buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
    step = len(buf) // max(rows, 1)
    return np.array([(ROW_TAG << 32) | crc(buf[i * step:(i + 1) * step]) for i in range(rows)], dtype=np.uint64)


def _write_header(fd: int, path: Path, ext: np.ndarray, ext_off: int, crc_off: int) -> None:
    size = os.fstat(fd).st_size
    head = _HEAD.pack(MAGIC, 1, len(ext), size, ext_off, crc_off, crc(ext.tobytes()), _meta_crc(fd, size, ext))
    block = head + struct.pack("<I", crc(head))
    _pwrite(fd, 0, np.frombuffer(block, np.uint8))
    os.fsync(fd)


def reseal(path: str | Path) -> None:
    """Recompute the metadata CRC after an in-place edit with h5py (``h5py.File(path, "r+")``).

    Row checksums are not recomputed: an edit of dataset bytes through h5py leaves those rows
    failing their check, as any other change that did not go through the engine's writers would.
    Raw flag edits need no reseal (flags carry no checksum).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE)
    if head[:8] != MAGIC:
        raise DamagedFileError(f"{path} has no entk checksum header to reseal")
    _, _, n, _, ext_off, crc_off, _, _ = _HEAD.unpack_from(head)
    fd = os.open(path, os.O_RDWR)
    try:
        ext = np.frombuffer(_pread(fd, ext_off, 32 * n), dtype=np.uint64).reshape(-1, 4)
        _write_header(fd, path, ext, ext_off, crc_off)
    finally:
        os.close(fd)


# -- checking ---------------------------------------------------------------------------------------


def check(path: str | Path, noun: str) -> Header | None:
    """Validate the header, the extents table and the metadata CRC of ``path`` before h5py opens it.

    Returns None for a file without checksums (format version 1, read unchecked with a warning).
    """
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE + 8)
    if head[:8] == HDF5_SIGNATURE:
        warnings.warn(f"{path} has no checksums (written before format version 2): it is read unchecked; "
                      f"recompute it to get them", stacklevel=3)
        return None
    if head[HEADER_SIZE:HEADER_SIZE + 8] != HDF5_SIGNATURE and head[:8] != MAGIC:
        raise DamagedFileError(f"{path} is not {noun} (neither an entk checksum header nor HDF5)")
    if len(head) < HEADER_SIZE or crc(head[:_HEAD.size]) != struct.unpack_from("<I", head, _HEAD.size)[0] \
            or head[:8] != MAGIC:
        raise DamagedFileError(f"{path} is damaged: its checksum header (bytes 0-{HEADER_SIZE - 1}) fails its CRC")
    _, _, n, want_size, ext_off, crc_off, ext_crc, meta_crc = _HEAD.unpack_from(head)
    if size != want_size:
        raise DamagedFileError(f"{path} is damaged: {size} bytes, but it was written with {want_size} "
                               f"(truncated or extended)")
    if not (HEADER_SIZE <= ext_off and ext_off + 32 * n <= size and n >= 1):
        raise DamagedFileError(f"{path} is damaged: its extents table lies outside the file")
    with open(path, "rb") as fh:
        fd = fh.fileno()
        raw = _pread(fd, ext_off, 32 * n)
        if crc(raw) != ext_crc:
            raise DamagedFileError(f"{path} is damaged: its extents table (the layout of the datasets) fails its CRC")
        ext = np.frombuffer(raw, dtype=np.uint64).reshape(-1, 4)
        if _meta_crc(fd, size, ext) != meta_crc:
            raise DamagedFileError(f"{path} is damaged: its HDF5 metadata (structure, attributes, job) fails its "
                                   f"CRC; it was not opened")
    return Header(size, ext, crc_off)


def _gaps(size: int, ext: np.ndarray) -> Iterable[tuple[int, int]]:
    pos = HEADER_SIZE
    for off, nbytes, _, _ in ext.tolist():
        if off > pos:
            yield pos, off
        pos = max(pos, off + nbytes)
    if pos < size:
        yield pos, size


def _meta_crc(fd: int, size: int, ext: np.ndarray) -> int:
    c = 0
    for a, b in _gaps(size, ext):
        while a < b:
            n = min(_CHUNK, b - a)
            c = zlib.crc32(_pread(fd, a, n), c)
            a += n
    return c & 0xFFFFFFFF


def _pread(fd: int, off: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = os.pread(fd, n - len(out), off + len(out))
        if not got:
            break
        out += got
    return bytes(out)


def _pwrite(fd: int, off: int, a: np.ndarray) -> None:
    buf = memoryview(np.ascontiguousarray(a)).cast("B")
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], off + done)
