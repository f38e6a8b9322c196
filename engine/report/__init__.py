"""The top layer: figures of the paper's experiments from stored results (matplotlib, no
display needed), the report documents, and the one-command study behind `entk reproduce`."""

from .basins import plot_basins
from .document import write_report
from .figures import plot_chaos, plot_cone, plot_growth, plot_kernel_diagnostics, plot_kernel_distance
from .study import Preset, draw_study, hardware, lr_changes, preset, reproduce, transition_entry

__all__ = ["Preset", "draw_study", "hardware", "lr_changes", "plot_basins", "plot_chaos", "plot_cone", "plot_growth",
           "plot_kernel_diagnostics", "plot_kernel_distance", "preset", "reproduce", "transition_entry",
           "write_report"]
