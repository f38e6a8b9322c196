"""Storage of long jobs: memory-mapped, resumable HDF5 files (layouts in docs/FORMAT.md)."""

from .blockfile import BlockFile, StoreError
from .jacobian_store import JacobianStore
from .kernel_store import KernelStore, kernel_name

__all__ = ["BlockFile", "JacobianStore", "KernelStore", "StoreError", "kernel_name"]

# TEMP (CLI branch only; drop at merge): RunFile moves here in the storage-layer branch.
from ..train.runfile import RunFile

__all__ += ["RunFile"]
