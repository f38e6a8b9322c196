"""Jobs that read and write files, above the library layers (below ``report`` and the CLI)."""

from .chaos import FIELDS, ChaosConfig, ChaosResult, load_chaos, run_chaos, write_summary

__all__ = ["FIELDS", "ChaosConfig", "ChaosResult", "load_chaos", "run_chaos", "write_summary"]
