"""Jobs that read and write files, above the library layers and below the CLI."""

from .kernel_job import KernelJobResult, kernel_job

__all__ = ["KernelJobResult", "kernel_job"]
