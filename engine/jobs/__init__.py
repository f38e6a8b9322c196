"""Jobs that read and write engine files, above the library layers and below ``report`` and the CLI."""

from .chaos import FIELDS, ChaosConfig, ChaosResult, load_chaos, run_chaos, write_summary
from .kernel_job import KernelJobResult, kernel_job
from .kernels import CheckpointKernels, checkpoint_kernels, probe_set
from .presets import PRESETS, Preset, preset
from .study import run_study

__all__ = ["FIELDS", "PRESETS", "ChaosConfig", "ChaosResult", "CheckpointKernels", "KernelJobResult", "Preset",
           "checkpoint_kernels", "kernel_job", "load_chaos", "preset", "probe_set", "run_chaos", "run_study",
           "write_summary"]
