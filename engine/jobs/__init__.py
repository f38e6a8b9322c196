"""Jobs that read and write engine files, above the library layers and below ``report`` and the CLI."""

from .kernels import CheckpointKernels, checkpoint_kernels, probe_set

__all__ = ["CheckpointKernels", "checkpoint_kernels", "probe_set"]
