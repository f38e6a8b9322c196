"""The eNTKs of many checkpoints of one run in one HDF5 file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .blockfile import BlockFile, StoreError


def kernel_name(iteration: int) -> str:
    return f"it_{int(iteration):08d}"


class KernelStore(BlockFile):
    """``/data/it_<iteration:08d>``: one ``(M, M)`` kernel per checkpoint, plus distances.

    Unit ``k < T`` is the kernel of ``iterations[k]``; unit ``T`` is the pairwise
    results ``/data/kernel_gram`` (⟨H_i, H_j⟩_F, float64) and ``/data/distance``
    (1 − cosine, float64), written once every kernel is complete.
    Each kernel dataset carries ``iteration``, ``model``, ``probe_hash``, ``mode``,
    ``kernel`` and ``dtype`` attributes.
    """

    FORMAT = "entk-kernels"
    NOUN = "entk kernel file"

    @classmethod
    def create_for(cls, path: str | Path, *, job: Mapping, iterations: Sequence[int], size: int,
                   dtype: torch.dtype = torch.float32, data: Mapping | None = None,
                   overwrite: bool = False, shape: Sequence[int] | None = None) -> KernelStore:
        iterations = [int(i) for i in iterations]
        if len(set(iterations)) != len(iterations):
            raise StoreError(f"checkpoint iterations must be unique, got {iterations}")
        t = len(iterations)
        # Square (size, size) kernels, or another stored shape (the diagonal kernel's (N·C, C) blocks).
        shape = (size, size) if shape is None else tuple(int(d) for d in shape)
        job = {**job, "iterations": iterations, "size": size, "dtype": str(dtype)}
        if shape != (size, size):
            job["shape"] = list(shape)
        datasets = {kernel_name(i): (shape, dtype) for i in iterations}
        datasets["kernel_gram"] = ((t, t), torch.float64)
        datasets["distance"] = ((t, t), torch.float64)
        attrs = {kernel_name(i): {"iteration": i, "model": str(job.get("model", "")),
                                  "probe_hash": str(job.get("probe_hash", "")),
                                  "mode": str(job.get("mode", "")), "kernel": str(job.get("kernel", "")),
                                  "dtype": str(dtype)} for i in iterations}
        return cls.open_or_create(path, job=job, data=data, overwrite=overwrite, n_units=t + 1,
                                  datasets=datasets, attrs=attrs)

    @property
    def iterations(self) -> list[int]:
        return [int(i) for i in self.job["iterations"]]

    def completed_iterations(self) -> list[int]:
        done = self.complete
        return [it for k, it in enumerate(self.iterations) if done[k]]

    def kernel(self, iteration: int) -> np.memmap:
        """The kernel of ``iteration`` as a read-only memory map (refused if incomplete)."""
        if iteration not in self.iterations:
            raise StoreError(f"iteration {iteration} is not in {self.path} (has {self.iterations})")
        if not self.complete[self.iterations.index(iteration)]:
            raise StoreError(f"the kernel of iteration {iteration} in {self.path} was never completed")
        return self.verified(kernel_name(iteration))

    def kernels(self) -> list[np.memmap]:
        """Memory maps of every completed kernel, in iteration order."""
        return [self.kernel(i) for i in self.completed_iterations()]

    def distances(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(kernel_gram, distance)``, each ``(T, T)`` float64, or None if not computed yet."""
        if not self.complete[len(self.iterations)]:
            return None
        return np.array(self.verified("kernel_gram")), np.array(self.verified("distance"))
