"""Storage of long jobs: memory-mapped, resumable HDF5 files (layouts in docs/FORMAT.md)."""

from .blockfile import BlockFile, StoreError
from .jacobian_store import JacobianStore
from .kernel_store import KernelStore, kernel_name
from .kernel_tiles import KernelTiles, TiledKernel, open_kernel

__all__ = ["BlockFile", "JacobianStore", "KernelStore", "KernelTiles", "StoreError", "TiledKernel", "kernel_name",
           "open_kernel"]
