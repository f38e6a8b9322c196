"""TEMP (CLI branch only; drop at merge): the jobs layer's names, re-exported from where they live
before the move, so that the CLI can import them the way the target layout says."""

from ..analysis import ChaosConfig, ChaosResult, load_chaos, run_chaos, write_summary
from ..ntk import CheckpointKernels, checkpoint_kernels, probe_set

__all__ = ["ChaosConfig", "ChaosResult", "CheckpointKernels", "checkpoint_kernels", "load_chaos", "probe_set",
           "run_chaos", "write_summary"]
