"""The top layer: figures of the paper's experiments from stored results (matplotlib, no
display needed), the report documents, and the one-command study behind `entk reproduce`."""

from .document import write_report
from .figures import plot_chaos, plot_cone, plot_growth, plot_kernel_diagnostics, plot_kernel_distance
from .study import Preset, hardware, lr_changes, preset, reproduce, transition_entry

__all__ = ["Preset", "hardware", "lr_changes", "plot_chaos", "plot_cone", "plot_growth", "plot_kernel_diagnostics",
           "plot_kernel_distance", "preset", "reproduce", "transition_entry", "write_report"]
