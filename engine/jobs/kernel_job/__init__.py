"""``entk kernel``: one eNTK larger than memory, tile by tile, resumable, sharded over torch.distributed ranks.

The kernel of inputs x1 (and x2 for a cross-kernel) is cut into tiles of ``t`` inputs per side,
``t`` chosen from the memory budget; each tile is computed, written into a
:class:`~engine.store.KernelTiles` file and flagged complete, so the job never holds H and
resumes at tile granularity after any crash. The Jacobian blocks either go to a resumable
Jacobian store beside the output (each computed once, when they fit the disk budget) or are
recomputed for every tile pair.

Under ``torchrun`` (``WORLD_SIZE > 1``) rank r takes the tiles k with ``k % world == r``, on
``cuda:LOCAL_RANK`` or the CPU. Files are written without parallel HDF5: rank 0 creates every
file with its whole layout fixed (``engine.h5raw``); afterwards each rank only ``pwrite``\\ s raw
bytes at the fixed offsets of its own tiles and completion flags, so ranks never write the same
byte and no HDF5 metadata changes. The collectives are barriers and short status messages
over gloo (also on GPUs). Every tile is a pure function of its inputs, so the file is
bit-identical for any number of ranks, and a rerun after any rank died resumes.

The package by concern: :mod:`.plan` (kernel kinds, the tile size from the process memory, the
stored-or-recomputed choice), :mod:`.inputs` (the model and the selected inputs), :mod:`.tiles`
(one tile from the model or from two J blocks), :mod:`.blocks` (the stored J blocks: written,
then read tile by tile) and :mod:`.job` (:func:`kernel_job`, which runs them in order).
"""

import warnings

from ...data import balanced_indices
from .inputs import load_model_fn, parse_inputs
from .job import KernelJobResult, kernel_job
from .plan import (
    DEFAULT_PROCESS_MEMORY,
    PROCESS_ALLOWANCE,
    KernelKind,
    choose_tile_inputs,
    memory_in_use,
    parse_compute_dtype,
    resident_bytes,
    tile_bytes,
)

__all__ = ["DEFAULT_PROCESS_MEMORY", "PROCESS_ALLOWANCE", "KernelJobResult", "KernelKind", "balanced_indices",
           "choose_tile_inputs", "kernel_job", "load_model_fn", "memory_in_use", "parse_compute_dtype", "parse_inputs",
           "resident_bytes", "tile_bytes"]


def __getattr__(name: str):
    # The old name of DEFAULT_PROCESS_MEMORY, kept for one release.
    if name == "DEFAULT_PROCESS_BUDGET":
        warnings.warn("engine.jobs.kernel_job.DEFAULT_PROCESS_BUDGET is deprecated; use DEFAULT_PROCESS_MEMORY "
                      "(the same whole-process peak memory)", DeprecationWarning, stacklevel=2)
        return DEFAULT_PROCESS_MEMORY
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
