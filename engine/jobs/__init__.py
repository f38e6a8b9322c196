"""Jobs that read and write engine files, above the library layers and below ``report`` and the CLI."""

from .chaos import FIELDS, ChaosConfig, ChaosResult, load_chaos, run_chaos, write_summary
from .kernel_job import KernelJobResult, kernel_job
from .kernels import CheckpointKernels, checkpoint_kernels, probe_set

__all__ = ["FIELDS", "ChaosConfig", "ChaosResult", "CheckpointKernels", "KernelJobResult", "checkpoint_kernels",
           "kernel_job", "load_chaos", "probe_set", "run_chaos", "write_summary"]
