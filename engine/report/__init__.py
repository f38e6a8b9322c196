"""The top layer: figures of the paper's experiments from stored results (matplotlib, no
display needed), the report documents, and the one-command study behind `entk reproduce`."""

from .document import write_report
from .figures import plot_chaos, plot_cone, plot_kernel_distance
from .study import Preset, hardware, preset, reproduce

__all__ = ["Preset", "hardware", "plot_chaos", "plot_cone", "plot_kernel_distance", "preset", "reproduce",
           "write_report"]
