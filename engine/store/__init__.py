"""Storage of long jobs: memory-mapped, resumable HDF5 files (layouts in docs/FORMAT.md)."""

from .blockfile import BlockFile, StoreError
from .chaos_store import ChaosStore as ChaosStore
from .jacobian_store import JacobianStore
from .kernel_store import KernelStore, kernel_name

__all__ = ["BlockFile", "JacobianStore", "KernelStore", "StoreError", "kernel_name"]
