"""Every file format of the engine, on one crash-safe block-file layer (layouts in docs/FORMAT.md)."""

from .blockfile import BlockFile, BlockWriter, StoreError
from .chaos_store import ChaosStore
from .data_record import data_mismatch, data_record, describe_data
from .jacobian_store import JacobianStore
from .kernel_store import KernelStore, kernel_name
from .kernel_tiles import KernelTiles, TiledKernel, open_kernel
from .runfile import RunFile

__all__ = ["BlockFile", "BlockWriter", "ChaosStore", "JacobianStore", "KernelStore", "KernelTiles", "RunFile",
           "StoreError", "TiledKernel", "data_mismatch", "data_record", "describe_data", "kernel_name", "open_kernel"]
