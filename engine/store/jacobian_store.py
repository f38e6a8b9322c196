"""Per-sample Jacobians streamed to a memory-mapped HDF5 file, block by block."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .blockfile import BlockFile


class JacobianStore(BlockFile):
    """``/data/jacobian``: ``(R, P)`` float32 or bfloat16, R = N·C rows (row n·C + c).

    Unit ``b`` covers inputs ``[b·block_inputs, (b+1)·block_inputs)``, i.e. rows
    ``[b·block_inputs·C, ...)``. The job (model, checkpoint, probe hash, mode,
    dtype, block size, backend, parameter layout) is in the ``job`` attribute.
    """

    FORMAT = "entk-jacobian"
    NOUN = "entk Jacobian file"

    @classmethod
    def create_for(cls, path: str | Path, *, job: Mapping, n_inputs: int, num_outputs: int,
                   n_params: int, block_inputs: int, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False) -> JacobianStore:
        if dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"Jacobian store dtype must be float32, bfloat16 or float64, got {dtype}")
        n_units = -(-n_inputs // block_inputs)
        job = {**job, "n_inputs": n_inputs, "num_outputs": num_outputs, "n_params": n_params,
               "block_inputs": block_inputs, "dtype": str(dtype)}
        return cls.open_or_create(path, job=job, overwrite=overwrite, n_units=n_units,
                                  datasets={"jacobian": ((n_inputs * num_outputs, n_params), dtype)})

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.datasets["jacobian"][0])

    @property
    def num_outputs(self) -> int:
        return int(self.job["num_outputs"])

    @property
    def block_inputs(self) -> int:
        return int(self.job["block_inputs"])

    def unit_inputs(self, unit: int) -> tuple[int, int]:
        """Input range ``[start, end)`` of block ``unit``."""
        b, n = self.block_inputs, int(self.job["n_inputs"])
        return unit * b, min((unit + 1) * b, n)

    def jacobian_memmap(self) -> np.memmap:
        """The stored Jacobian, memory-mapped (bfloat16 appears as its uint16 bits)."""
        return self.verified("jacobian")
