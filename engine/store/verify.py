"""``entk verify``: every checksum of an engine file, and which part fails (docs/FORMAT.md, "Checksums")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py

from . import integrity
from .blockfile import StoreError, StoreFile
from .chaos_store import ChaosStore
from .jacobian_store import JacobianStore
from .kernel_store import KernelStore
from .kernel_tiles import KernelTiles
from .runfile import RunFile

FORMATS: dict[str, type[StoreFile]] = {cls.FORMAT: cls for cls in (RunFile, KernelStore, KernelTiles, JacobianStore,
                                                                    ChaosStore)}


@dataclass
class Verification:
    path: Path
    format: str | None = None
    version: int | None = None
    datasets: int = 0
    rows: int = 0                 # rows whose checksum was checked (rows never written are skipped)
    units: tuple[int, int] = (0, 0)
    problem: str | None = None    # None: every checksum matches
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_file(path: str | Path) -> Verification:
    """Check ``path``: header, metadata, every written row, every completion flag.

    Raises :class:`StoreError` when ``path`` is not an engine file at all (missing, a directory,
    neither HDF5 nor an entk checksum header, or HDF5 of another format); a damaged engine file is
    reported in ``problem``.
    """
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{path} is a directory; expected an entk file (run, kernel, chaos or Jacobian)")
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(integrity.HEADER_SIZE + 8)
    ours = head[:8] == integrity.MAGIC or head[integrity.HEADER_SIZE:] == integrity.HDF5_SIGNATURE
    if not ours and head[:8] != integrity.HDF5_SIGNATURE:
        raise StoreError(f"{path} is not an entk file (neither an entk checksum header nor HDF5)")
    res = Verification(path)
    try:
        sums = integrity.check(path, "an entk file")
    except integrity.DamagedFileError as e:
        res.problem = str(e)
        return res
    try:
        with h5py.File(path, "r") as f:
            fmt, version = f.attrs.get("format"), f.attrs.get("format_version")
    except OSError as e:
        if sums is None:
            raise StoreError(f"{path} is not an entk file HDF5 can open ({e})") from None
        res.problem = f"{path} is damaged: HDF5 cannot open it ({e})"
        return res
    if fmt not in FORMATS:
        raise StoreError(f"{path} is not an entk file (format attribute {fmt!r}; expected one of "
                         f"{', '.join(sorted(FORMATS))})")
    res.format, res.version = str(fmt), int(version)
    if sums is None:
        res.problem = (f"{path} has no checksums (format version {version}, written before version 2): "
                       f"it cannot be verified")
        return res
    try:
        store = FORMATS[fmt](path)
        done = store.complete
        res.units = (int(done.sum()), len(done))
        for name in store.datasets:
            res.rows += store.verify_rows(name, written_only=True)
            res.datasets += 1
    except (StoreError, integrity.DamagedFileError) as e:
        res.problem = str(e) if "damaged" in str(e) else f"{path} is damaged: {e}"
    return res
